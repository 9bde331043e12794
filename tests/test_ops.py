"""lora_jax.ops: platform resolution, the accelerator code path on CPU against the CPU fast path,
splash attention's numerics (Pallas interpreter) and its TPU lowering (libtpu, no TPU needed)."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import ops
from lora_jax.config import preset
from lora_jax.lora import (LoraConfig, add_lora, combine_params, split_params,
                           trainable_labels)
from lora_jax.model import Llama, attention_mask, init_params
from lora_jax.ops import tpu_attention

CFG = preset("tiny")


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_platform_of_devices_and_meshes():
  assert ops.platform_of(jax.devices()) == "cpu"
  assert ops.platform_of(jax.devices()[0]) == "cpu"
  assert ops.platform_of(jax.make_mesh((1,), ("data",))) == "cpu"
  assert ops.resolve_platform("auto") == ops.resolve_platform(None) == "cpu"
  assert ops.resolve_platform("tpu", jax.devices()) == "tpu"  # an explicit setting wins
  with pytest.raises(ValueError, match="model.platform"):
    ops.resolve_platform("npu")
  with pytest.raises(ValueError, match="one platform"):
    ops.platform_of([])


def _packed_batch():
  """Two rows of packed documents; the first ends in padding (segment 0)."""
  B, L = 2, 24
  seg = np.ones((B, L), np.int32)
  seg[0, 9:] = 2
  seg[0, 20:] = 0
  seg[1, 5:] = 2
  seg[1, 14:] = 3
  pos = np.zeros((B, L), np.int32)
  for b in range(B):
    for s in set(seg[b]):
      idx = np.flatnonzero(seg[b] == s)
      pos[b, idx] = np.arange(len(idx))
  tokens = jax.random.randint(jax.random.key(3), (B, L), 3, CFG.vocab_size)
  return tokens, jnp.asarray(pos), jnp.asarray(seg)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_accelerator_path_matches_cpu_fast_path(platform, finetuning):
  """The accelerator code path (one LoraDense per projection, XLA attention; forced on CPU) gives
  the CPU fast path's logits and gradients, f32, packed segments, within 1e-5 relative."""
  tokens, pos, seg = _packed_batch()
  params = init_params(CFG, jax.random.key(0))
  lora = None
  if finetuning == "lora":
    lora = LoraConfig(rank=4, targets="all")
    params = add_lora(params, lora, jax.random.key(1))
    # B = 0 at init would hide the adapter path: give it weight.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(len(p)), x.shape)
        if p[-1].key == "lora_b" else x, params)
  trainable, frozen = split_params(params, trainable_labels(params, lora))
  keep = (seg != 0)[..., None]

  def loss_and_logits(model):
    def loss(tr):
      logits = model.apply({"params": combine_params(tr, frozen)}, tokens, pos, seg)
      logp = jax.nn.log_softmax(logits, -1)
      nll = -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)
      return jnp.sum(nll * keep[:, 1:]) / jnp.sum(keep[:, 1:]), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)

  (loss_cpu, logits_cpu), g_cpu = loss_and_logits(Llama(CFG, lora, platform="cpu"))
  accel_cfg = CFG.replace(attention_impl="xla") if platform == "tpu" else CFG  # f32: no cuDNN
  (loss_acc, logits_acc), g_acc = loss_and_logits(Llama(accel_cfg, lora, platform=platform))
  assert _rel_err(np.where(keep, logits_acc, 0), np.where(keep, logits_cpu, 0)) < 1e-5
  assert abs(float(loss_acc) - float(loss_cpu)) < 1e-5 * abs(float(loss_cpu))
  leaves_cpu, leaves_acc = jax.tree.leaves(g_cpu), jax.tree.leaves(g_acc)
  assert len(leaves_cpu) == len(leaves_acc) > 0
  for a, c in zip(leaves_acc, leaves_cpu):
    assert _rel_err(a, c) < 1e-5


def test_paths_differ_in_code():
  """The fork is real: CPU groups the adapted projections (a custom VJP per group), the
  accelerator path runs them under autodiff (only RoPE's custom VJP remains)."""
  lora = LoraConfig(rank=4, targets="all")
  params = add_lora(init_params(CFG, jax.random.key(0)), lora, jax.random.key(1))
  tokens = jnp.zeros((1, 8), jnp.int32)

  def prims(platform):
    jaxpr = jax.make_jaxpr(lambda p: Llama(CFG, lora, platform=platform).apply(
        {"params": p}, tokens))(params)
    return str(jaxpr)

  assert prims("cpu").count("custom_vjp_call") > prims("gpu").count("custom_vjp_call")


def _splash_inputs(B=1, L=128, H=4, K=2, Dh=16):
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (B, L, H, Dh))
  k = jax.random.normal(ks[1], (B, L, K, Dh))
  v = jax.random.normal(ks[2], (B, L, K, Dh))
  seg = np.ones((B, L), np.int32)
  seg[:, 50:] = 2
  seg[:, 110:] = 0  # trailing padding
  seg = jnp.asarray(seg)
  slots = jnp.arange(L)
  mask = attention_mask(seg, seg, jnp.broadcast_to(slots, (B, L)), slots)
  cot = jax.random.normal(ks[3], q.shape) * (seg != 0)[..., None, None]
  return q, k, v, seg, mask, cot


def test_splash_matches_reference_attention_forward_and_gradients():
  """Splash (Pallas interpreter on CPU), GQA + packed segments, against the reference attention
  (XLA's softmax attention under the same mask); padding rows are unused on every path."""
  q, k, v, seg, mask, cot = _splash_inputs()
  keep = (seg != 0)[..., None, None]
  splash = lambda q, k, v: tpu_attention.splash_attention(q, k, v, seg, interpret=True)  # noqa
  reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)  # noqa
  got, want = splash(q, k, v), reference(q, k, v)
  assert _rel_err(jnp.where(keep, got, 0), jnp.where(keep, want, 0)) < 1e-5
  grads = [jax.grad(lambda *a: jnp.sum(f(*a) * cot), (0, 1, 2))(q, k, v)
           for f in (splash, reference)]
  for got, want in zip(*grads):
    assert _rel_err(got, want) < 1e-5


def test_splash_applies_only_to_lane_multiples():
  assert tpu_attention.supported(4096) and tpu_attention.supported(128)
  assert not tpu_attention.supported(100)
  assert tpu_attention._block_sizes(4096).block_q == 512
  assert tpu_attention._block_sizes(384).block_q == 128


def test_attention_impl_is_validated():
  q, k, v, seg, mask, _ = _splash_inputs()
  with pytest.raises(ValueError, match="attention_impl"):
    ops.attention(q, k, v, mask, platform="tpu", impl="flash")


_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _LIBTPU, reason="libtpu not installed (pip install -e '.[tpu]')")
def test_train_step_compiles_for_tpu_with_splash_kernel():
  """On this CPU host, libtpu compiles the training setup's real step (tiny preset, bf16) for a
  v5e 2x2 slice of abstract devices: LoRA on a data-parallel mesh, full FT with remat and two
  microbatches on an fsdp x tensor mesh. The setup took the TPU path from the mesh's devices and
  the TPU program calls the splash kernels (forward, dq, dkv)."""
  script = textwrap.dedent("""
    import re, jax, jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P
    from lora_jax import config as rc
    from lora_jax.sharding import make_mesh
    from lora_jax.training.setup import Trainer
    from lora_jax.training.step import BATCH_KEYS
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    for lora, mesh_shape, micro in ((True, (4, 1, 1), 1), (False, (1, 2, 2), 2)):
      cfg = rc.default_config()
      cfg.train.steps, cfg.train.seq_len, cfg.train.global_batch = 1, 256, 8
      cfg.train.microbatches, cfg.model.remat = micro, micro > 1
      cfg.lora.enabled, cfg.model.dtype = lora, "bfloat16"
      cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_shape
      mesh = make_mesh(cfg.mesh, devices=devices)
      trainer = Trainer(cfg, total_steps=1, mesh=mesh)
      assert trainer.platform == "tpu"
      frozen = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            trainer.frozen_shapes, trainer.frozen_sharding)
      rows = NamedSharding(mesh, P(("data", "fsdp")))
      batch = {k: jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=rows) for k in BATCH_KEYS}
      hlo = trainer.step_fn.lower(trainer.abstract_state, frozen, batch).compile().as_text()
      kernels = sorted(set(re.findall(r"splash_mha_[a-z]+", hlo)))
      print("lora" if lora else "full", kernels)
      assert kernels == ["splash_mha_dkv", "splash_mha_dq", "splash_mha_fwd"], kernels
    print("OK")
  """)
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=900)  # two tiny compiles: about a minute each on a loaded 2-core host
  assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-3000:]


def test_training_setup_takes_the_platform_from_the_mesh_or_model_platform():
  from lora_jax import config as rc
  from lora_jax.training.setup import Trainer
  cfg = rc.default_config()
  cfg.train.steps = 1
  assert cfg.model.platform == "auto"
  assert Trainer(cfg, total_steps=1).model.platform == "cpu"  # this host's mesh: CPU devices
  cfg.model.platform = "tpu"
  rc.validate_config(cfg, num_devices=1)
  trainer = Trainer(cfg, total_steps=1)
  assert trainer.platform == trainer.model.platform == "tpu"
  cfg.model.platform = "npu"
  with pytest.raises(rc.ConfigError, match="model.platform"):
    rc.validate_config(cfg, num_devices=1)


def test_accelerator_kernels_only_on_their_devices():
  """platform=tpu / gpu on a CPU mesh (model.platform forced on this host) runs XLA's attention:
  no Pallas or cuDNN call is traced."""
  q, k, v, seg, mask, _ = _splash_inputs()
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))  # within cuDNN's constraints
  mesh = jax.make_mesh((1,), ("data",))
  for platform in ("tpu", "gpu"):
    fn = lambda q: ops.attention(q, k16, v16, mask, segment_ids_BL=seg,  # noqa: E731
                                 platform=platform, mesh=mesh)
    jaxpr = str(jax.make_jaxpr(fn)(q16))
    assert "pallas_call" not in jaxpr and "cudnn" not in jaxpr
  splash = str(jax.make_jaxpr(lambda q: ops.attention(q, k, v, mask, segment_ids_BL=seg,
                                                      platform="tpu"))(q))
  assert "pallas_call" in splash  # without a mesh the TPU path does call the kernel
