"""Sharding: logical axis rules, and the same losses on 1 device and on 8 fake CPU devices
with meshes (8,1,1), (1,8,1), (2,2,2) for LoRA and full finetuning."""

import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from lora_jax import sharding
from lora_jax.config import preset
from lora_jax.lora import LoraConfig
from lora_jax.model import param_logical_axes, param_shapes

from _train_support import CACHE_ENV

TESTS = os.path.dirname(os.path.abspath(__file__))


class _FakeMesh:
  def __init__(self, **shape):
    self.shape = shape


def test_logical_rules_and_fallbacks():
  mesh = _FakeMesh(data=2, fsdp=4, tensor=2)
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 176), mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("vocab", "embed"), (320, 64), mesh) == P("tensor", "fsdp")
  assert sharding.logical_to_spec(("embed", "lora_rank"), (64, 4), mesh) == P("fsdp", None)
  assert sharding.logical_to_spec(("norm",), (64,), mesh) == P(None)
  # a dimension its mesh axes do not divide stays replicated
  assert sharding.logical_to_spec(("embed", "mlp"), (6, 176), mesh) == P(None, "tensor")
  # a mesh axis is never used twice in one spec
  assert sharding.logical_to_spec(("mlp", "heads"), (8, 8), mesh) == P("tensor", None)
  assert sharding.logical_to_spec(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)


def test_param_shardings_cover_every_leaf_single_device():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  cfg, lora = preset("tiny"), LoraConfig(rank=4)
  shard = sharding.tree_shardings(param_shapes(cfg, lora), param_logical_axes(cfg, lora), mesh)
  leaves = jax.tree_util.tree_leaves(shard)
  assert len(leaves) == len(jax.tree_util.tree_leaves(param_shapes(cfg, lora)))
  assert all(s.mesh.shape == mesh.shape for s in leaves)


_SCRIPT = r"""
import json, sys
import jax, numpy as np
from lora_jax import sharding
from lora_jax.training import Trainer
from _train_support import StandInData, tiny_cfg

assert jax.device_count() == 8, jax.devices()
out = {}
for lora in (sys.argv[1] == "lora",):
  for shape in ((1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2)):
    cfg = tiny_cfg(None, lora=lora, steps=3)
    cfg.lora.dropout = 0.05  # dropout masks must not depend on the sharding either
    mesh_cfg = dict(zip(("data", "fsdp", "tensor"), shape))
    devices = jax.devices()[:int(np.prod(shape))]
    trainer = Trainer(cfg, total_steps=3, mesh=sharding.make_mesh(mesh_cfg, devices))
    trainer.init_state()
    data = StandInData(8, 32)
    losses = [float(trainer.step(next(data))["loss"]) for _ in range(3)]
    specs = sorted({str(s.spec) for s in jax.tree_util.tree_leaves(trainer.state_sharding)})
    out[f"{'lora' if lora else 'full'} {shape}"] = {"losses": losses, "specs": specs}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_meshes_give_the_same_loss_as_one_device(tmp_path, kind):
  script = tmp_path / "meshes.py"
  script.write_text(_SCRIPT)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu", **CACHE_ENV)
  # timeout: 4 meshes x 3 steps, each compiled, on a loaded 2-core machine; a hang fails the test
  proc = subprocess.run([sys.executable, str(script), kind], env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
  out = json.loads(line[len("RESULT"):])
  ref = out[f"{kind} (1, 1, 1)"]["losses"]
  for shape in ("(8, 1, 1)", "(1, 8, 1)", "(2, 2, 2)"):
    got = out[f"{kind} {shape}"]["losses"]
    # sharded reductions sum f32 partial sums in another order: equal up to rounding
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-5, (kind, shape, got, ref)
  assert ref[-1] < ref[0]
  # the meshes really shard: FSDP and tensor axes appear in the state's specs
  assert any("fsdp" in s for s in out[f"{kind} (1, 8, 1)"]["specs"])
  assert any("tensor" in s for s in out[f"{kind} (2, 2, 2)"]["specs"])
