"""Pre-flight for the launchers: every training command of a job is planned for the slice that
is about to be created, and a run that does not fit is refused before any slice exists.

Runs that differ only in what cannot change memory (learning rate, schedule, data, output
directory...) share one plan: a paper sweep of 16 runs is 4 plans (full FT and three ranks).
"""

from __future__ import annotations

import os
import shlex
from typing import Callable, Sequence

from lora_jax import config as rc

# Config keys the plan depends on; runs equal in all of them share one plan.
PLAN_KEYS = ("model.", "lora.", "full_ft_frozen", "optimizer.name", "train.global_batch",
             "train.seq_len", "train.microbatches", "mesh.")
MODES = ("compile", "analytic", "off")


def train_config(argv: Sequence[str], repo_root: str):
  """The run config of a `lora-jax train --config FILE [--config.k=v ...]` command (FILE
  relative to the repository), or None for any other command."""
  argv = list(argv)
  if argv[:2] != ["lora-jax", "train"] or "--config" not in argv:
    return None
  i = argv.index("--config")
  path = argv[i + 1]
  overrides = [a for a in argv[2:] if a.startswith("--config.")]
  return rc.load_config(path if os.path.isabs(path) else os.path.join(repo_root, path),
                        overrides)


def _key(cfg) -> tuple:
  flat = rc.flatten(cfg)
  return tuple(sorted((k, repr(v)) for k, v in flat.items()
                      if any(k == p or k.startswith(p) for p in PLAN_KEYS)))


def check(commands: Sequence[Sequence[str]], names: Sequence[str], accelerator_type: str, *,
          mode: str = "compile", repo_root: str = ".",
          note: Callable[[str], None] = print) -> bool:
  """Plans every training command for `accelerator_type`; notes each verdict (and, for a run
  that does not fit, its numbers and the overrides `plan --auto` suggests). True when all
  fit."""
  from lora_jax.plan import search
  from lora_jax.plan.report import GiB
  groups: dict[tuple, tuple] = {}
  for argv, name in zip(commands, names):
    cfg = train_config(argv, repo_root)
    if cfg is None:
      note(f"preflight: not a training command, not planned: {shlex.join(argv)}")
      continue
    groups.setdefault(_key(cfg), (cfg, []))[1].append(name)
  analytic = mode == "analytic"
  ok = True
  for cfg, run_names in groups.values():
    r = search.plan(cfg, accelerator_type, programs=("train",), analytic=analytic)
    pd = r["per_device"]
    who = ", ".join(run_names)
    numbers = (f"{pd.get('peak_bytes', 0) / GiB:.2f} GiB of {pd['hbm_bytes'] / GiB:.2f} GiB "
               f"per device ({r['basis']})")
    if r["fits"]:
      note(f"preflight {accelerator_type}: fits: {who}: {numbers}")
      continue
    ok = False
    note(f"preflight {accelerator_type}: DOES NOT FIT, refused: {who}: {numbers}")
    if "frozen_base_bytes" in pd:
      note("  frozen base {:.2f} GiB, trainable {:.2f} GiB, optimizer {:.2f} GiB, temporaries "
           "{:.2f} GiB".format(*(pd[k] / GiB for k in (
               "frozen_base_bytes", "trainable_bytes", "optimizer_bytes", "temp_bytes"))))
    if r["compile_error"]:
      note(f"  compiler: {r['compile_error'][:300]}")
    best = search.plan(cfg, accelerator_type, auto=True, programs=("train",), analytic=analytic)
    if best["fits"]:
      note(f"  fits with: {' '.join(best['setting']['overrides'])} "
           f"({best['per_device']['peak_bytes'] / GiB:.2f} GiB per device)")
    else:
      note(f"  no remat / microbatch / mesh setting fits {accelerator_type}: choose a larger "
           "slice (see lora-jax plan --auto)")
  return ok
