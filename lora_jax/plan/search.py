"""`plan`: a run's memory and cost on a target (TPU slice or the local CPU), for its own setting
or, with `auto`, for the fastest setting that fits.

`auto` ranks every (remat policy, microbatches, data/fsdp/tensor split) with the analytic model
(`memory_model`), then compiles the best candidate, and the next one only if the compiler says
the first does not fit: a 7B compile takes minutes.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from lora_jax import config as rc
from lora_jax import sharding
from lora_jax.plan import compile as pc
from lora_jax.plan import memory_model as mm
from lora_jax.plan import topologies

PROGRAMS = ("train", "eval", "prefill", "decode")
COMPILE_AT_MOST = 2


@dataclasses.dataclass
class Target:
  """Devices to compile for and the per-device figures the estimate uses."""
  name: str
  devices: list
  num_chips: int
  hbm_bytes: int  # per device
  peak_flops: float | None  # per device, bf16
  hbm_bytes_per_s: float | None
  ici_bytes_per_s: float | None
  source: str

  def to_json(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["devices"] = len(self.devices)
    return d


def target(name: str) -> Target:
  """`cpu` (this host's CPU devices, its RAM as the memory) or a TPU slice name."""
  if name == "cpu":
    import jax
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Target("cpu", jax.devices("cpu"), 1, ram, None, None, None,
                  "host RAM (os.sysconf); no published peak FLOP/s for a CPU: no roofline")
  sl = topologies.resolve(name)
  devices = pc.tpu_devices(sl.topology)
  per_chip = len(devices) // sl.num_chips  # v4 and v5p topologies expose each TensorCore
  c = sl.chip
  return Target(f"{name} ({sl.topology}, {sl.num_chips} chips of {c.family})", devices,
                sl.num_chips, c.hbm_bytes // per_chip, c.peak_bf16_flops / per_chip,
                c.hbm_bytes_per_s / per_chip, c.ici_bytes_per_s / per_chip, c.source)


def _with(cfg: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  for o in overrides:
    key, _, value = o[len(rc.OVERRIDE_PREFIX):].partition("=")
    rc.apply_override(cfg, key, value)
  return cfg


def _compile(cfg, tgt: Target, programs, generation) -> dict:
  """Compiles; a program the compiler finds too big for the device comes back as an error."""
  try:
    got = pc.compile_run(cfg, tgt.devices, programs=programs,
                         generation=generation)
  except Exception as e:  # noqa: BLE001  XLA reports out-of-memory as a runtime error
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return {"error": str(e).strip().splitlines()[0][:2000]}
  return {"got": got}


def _current(cfg) -> mm.Candidate:
  return mm.Candidate(
      next(k for k, v in mm.REMAT.items()
           if v[0] == bool(cfg.model.remat)
           and (not v[0] or v[1] == cfg.model.overrides.get("remat_policy", "nothing_saveable"))),
      int(cfg.train.microbatches), tuple(cfg.mesh[a] for a in sharding.MESH_AXES))


def plan(cfg: ml_collections.ConfigDict, target_name: str, *, auto: bool = False,
         programs: tuple[str, ...] = PROGRAMS,
         generation: tuple[int, int, int] | None = None, analytic: bool = False) -> dict:
  """The plan as a JSON-able dict (see report.py for its fields). `analytic`: the memory
  model's numbers only, nothing compiled (seconds instead of minutes at 7B)."""
  tgt = target(target_name)
  cfg, note = pc.without_weights(cfg)
  n = len(tgt.devices)
  shapes = _shapes(cfg, tgt)
  t = cfg.train
  kw = dict(global_batch=t.global_batch, seq_len=t.seq_len, peak_flops=tgt.peak_flops or 1e12,
            ici_bytes_per_s=tgt.ici_bytes_per_s or 0.0)
  if auto:
    ranked = mm.rank(shapes, tgt.devices, tgt.hbm_bytes, **kw)
    tries = [c for c, e in ranked if mm.fits(e, tgt.hbm_bytes)][:COMPILE_AT_MOST] or \
        [ranked[0][0]]
  else:
    sizes = sharding.mesh_shape(cfg.mesh, n)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = sizes
    current = _current(cfg)
    ranked = [(current, mm.estimate(shapes, current, tgt.devices, **kw))]
    tries = [current]
  attempts = []
  if analytic:
    cand, est = next((c, e) for c, e in ranked if c == tries[0])
    attempts.append((cand, _with(cfg, cand.overrides()), {"analytic": est}))
    tries = []
  for cand in tries:
    run_cfg = _with(cfg, cand.overrides())
    result = _compile(run_cfg, tgt, programs, generation)
    attempts.append((cand, run_cfg, result))
    if "got" in result and _fits(result["got"], tgt):
      break
  from lora_jax.plan import report
  return report.build(target=tgt, note=note, ranked=ranked, attempts=attempts,
                      shapes=shapes, auto=auto)


def _shapes(cfg, tgt: Target) -> mm.Shapes:
  """Parameter shapes, axes and labels of the run (a Trainer over the target's devices)."""
  from lora_jax.training.setup import Trainer
  base = _with(cfg, ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1"])
  mesh = sharding.make_mesh(base.mesh, tgt.devices)
  return mm.run_shapes(Trainer(base, total_steps=1, mesh=mesh))


def _fits(got: pc.Programs, tgt: Target) -> bool:
  return all(p.total_bytes <= tgt.hbm_bytes for p in got.programs.values())

