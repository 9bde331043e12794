"""Ahead-of-time compilation of a run's programs for a TPU slice (or the local CPU).

libtpu compiles for a named TPU topology on a host without TPUs:
`jax.experimental.topologies.get_topology_desc` gives abstract TPU devices, the run's mesh is
built over them, and each jitted program is lowered with `jax.ShapeDtypeStruct` arguments that
carry the run's `NamedSharding`s, then compiled. Nothing is allocated and no device is needed;
the compiled programs report `memory_analysis()` and `cost_analysis()` per device.

Programs: the real train step (`Trainer.step_fn`), the eval forward (the log-likelihood scoring
of `evals.scoring`) and generation's prefill and decode (`generate._device_fns`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

# Tests and benchmarks start several processes that load libtpu; without this the second one
# refuses to (libtpu takes a lock meant for real TPU hosts).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from lora_jax import config as rc  # noqa: E402
from lora_jax import sharding  # noqa: E402

TPU_EXTRA_HINT = ("compiling for a TPU slice needs libtpu, which lora-jax installs with its "
                  "`tpu` extra: pip install -e '.[tpu]' (or pip install 'jax[tpu]' matching "
                  "your jax version)")


class LibtpuMissing(RuntimeError):
  pass


def tpu_devices(topology: str) -> list:
  """Abstract TPU devices of a libtpu topology such as "v5e:2x4"."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise LibtpuMissing(TPU_EXTRA_HINT) from None
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


@dataclasses.dataclass
class Compiled:
  """What one compiled program reports, per device."""
  name: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float
  compile_seconds: float
  splash_kernels: list[str]  # the Pallas splash-attention kernels the program calls (TPU)
  hlo_text: str = dataclasses.field(default="", repr=False)

  @property
  def total_bytes(self) -> int:
    """Peak per device: arguments + outputs not aliased to (donated) arguments + temporaries
    + the program itself."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("hlo_text")
    d["total_bytes"] = self.total_bytes
    return d


def compile_program(name: str, jitted, *args, keep_hlo: bool = False, **kwargs) -> Compiled:
  t0 = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per device
  # cost_analysis()["optimal_seconds"] is not used: it comes out negative for some programs.
  hlo = compiled.as_text()
  return Compiled(name=name, argument_bytes=int(mem.argument_size_in_bytes),
                  output_bytes=int(mem.output_size_in_bytes),
                  alias_bytes=int(mem.alias_size_in_bytes),
                  temp_bytes=int(mem.temp_size_in_bytes),
                  code_bytes=int(mem.generated_code_size_in_bytes),
                  flops=float(cost.get("flops", 0.0)),
                  bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                  compile_seconds=seconds,
                  splash_kernels=sorted(set(re.findall(r"splash_mha_[a-z_]+", hlo))),
                  hlo_text=hlo if keep_hlo else "")


def without_weights(cfg: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, str]:
  """Planning needs the model's shape, not its weights: a `model.hf_path` whose config.json is
  not here (the weights live on the training host) is planned as `model.preset`."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  hf = cfg.model.hf_path
  if hf and not os.path.exists(os.path.join(hf, "config.json")):
    cfg.model.hf_path = ""
    return cfg, (f"model.hf_path={hf} has no config.json here: planned with "
                 f"model.preset={cfg.model.preset}")
  return cfg, ""


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _batch(mesh, rows: int, length: int) -> dict:
  from lora_jax.training.step import BATCH_KEYS
  sh = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=sh) for k in BATCH_KEYS}


@dataclasses.dataclass
class Programs:
  """The run's trainer (shapes, shardings) and its compiled programs."""
  trainer: Any
  mesh: Any
  programs: dict[str, Compiled]


def compile_run(cfg: ml_collections.ConfigDict, devices: list, *,
                programs: tuple[str, ...] = ("train", "eval", "prefill", "decode"),
                generation: tuple[int, int, int] | None = None,
                keep_hlo: bool = False) -> Programs:
  """Compiles the requested programs of run `cfg` for `devices` (abstract TPU devices or the
  local CPU devices), with the kernels of their platform (`model.platform`: "auto" = theirs).
  `generation` = (batch, prompt length, new tokens) for prefill/decode
  (default: one row per data-parallel device, prompt 512, 512 new tokens)."""
  from lora_jax.training.setup import Trainer
  cfg = without_weights(cfg)[0]
  rc.validate_config(cfg, num_devices=len(devices))
  mesh = sharding.make_mesh(cfg.mesh, devices)
  out: dict[str, Compiled] = {}
  trainer = Trainer(cfg, total_steps=max(int(cfg.train.steps), 1), mesh=mesh)
  frozen = _abstract(trainer.frozen_shapes, trainer.frozen_sharding)
  t = cfg.train
  if "train" in programs:
    out["train"] = compile_program(
        "train", trainer.step_fn, trainer.abstract_state, frozen,
        _batch(mesh, t.global_batch, t.seq_len), keep_hlo=keep_hlo)
  params = _abstract(trainer.shapes, trainer.param_sharding)
  if "eval" in programs:  # the log-likelihood scoring of the multiple-choice evals
    from lora_jax.evals.scoring import _score_fn
    score, _ = _score_fn(trainer.model_config, trainer.lora_config, trainer.platform, mesh)
    rows = _batch(mesh, t.global_batch // t.microbatches, t.seq_len)
    out["eval"] = compile_program("eval", score, params, rows["tokens"], rows["tokens"],
                                  rows["segment_ids"], keep_hlo=keep_hlo)
  if {"prefill", "decode"} & set(programs):
    out.update(_compile_generation(trainer, mesh, params, generation, programs, keep_hlo))
  return Programs(trainer=trainer, mesh=mesh, programs=out)


def _compile_generation(trainer, mesh, params, generation, programs, keep_hlo) -> dict:
  from lora_jax.generate import _device_fns
  dp = sharding.data_parallel_size(mesh)
  batch, prompt, new = generation or (dp, 512, 512)
  mc = trainer.model_config
  prefill, decode, _ = _device_fns(mc, trainer.lora_config, (mc.eos_token_id,), 0,
                                   jnp.dtype(mc.dtype), trainer.platform)
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  rep = sharding.replicated(mesh)
  i32 = lambda shape, sh=rows: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh)  # noqa: E731
  f32 = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  sampling = (i32((), rep), f32, f32, i32((), rep))  # seed, temperature, top_p, top_k
  prefill_args = (params, i32((batch, prompt)), i32((batch, prompt)), i32((batch, prompt)),
                  i32((batch,)), *sampling)
  static = dict(greedy=True, cache_len=prompt + new)
  out = {}
  if "prefill" in programs:
    out["prefill"] = compile_program("prefill", prefill, *prefill_args, keep_hlo=keep_hlo,
                                     **static)
  if "decode" in programs:
    cache, tok_B = jax.eval_shape(lambda *a: prefill(*a, **static), *prefill_args)
    cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=rows if x.ndim else rep), cache)
    state = dict(cache=cache, tok_B=i32((batch,)), pos_B=i32((batch,)), step=i32((), rep),
                 done_B=jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=rows),
                 out_BT=i32((batch, new)))
    out["decode"] = compile_program("decode", decode, params, state, i32((), rep),
                                    i32((batch,)), *sampling, greedy=True, keep_hlo=keep_hlo)
  return out
