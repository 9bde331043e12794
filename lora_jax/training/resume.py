"""A run's output_dir before and between sessions: checks that it can hold the run, resuming
from the newest checkpoint that restores, and the checks that a checkpoint belongs to this run.

  - `check_output_dir`: writable, with free space for one checkpoint;
  - `check_resume_config`: a resumed run's saved config.json equals this one (or `force`);
  - `restore_newest`: the newest checkpoint that restores; damaged newer ones are moved to
    output_dir/checkpoints_unreadable/ (kept for inspection, never deleted);
  - `check_base`: the checkpoint was trained on this frozen base (its fingerprint);
  - `save_errors`: a failed checkpoint write becomes a TrainingError naming the last good one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time

import jax

from lora_jax import checkpoint as ckpt
from lora_jax import config as rc
from lora_jax.training.errors import TrainingError

log = logging.getLogger(__name__)

UNREADABLE_DIR = "checkpoints_unreadable"


def check_output_dir(path: str, needed_bytes: int) -> None:
  """Raises TrainingError if output_dir cannot be created/written or lacks free space."""
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write-probe-{os.getpid()}-{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.unlink(probe)
  except OSError as e:
    raise TrainingError(f"output_dir: cannot write to {path!r}: {e}") from None
  free = shutil.disk_usage(path).free
  if needed_bytes > free:
    raise TrainingError(f"output_dir: {path!r} has {free / 2**30:.2f} GiB free but one checkpoint "
                        f"needs ~{needed_bytes / 2**30:.2f} GiB")


def latest_checkpoint_on_disk(output_dir: str) -> int | None:
  """The newest committed checkpoint step (a directory listing: no orbax manager needed)."""
  d = os.path.join(output_dir, ckpt.CHECKPOINT_DIR)
  steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
  return max(steps) if steps else None


def check_resume_config(cfg, output_dir: str, force: bool) -> None:
  """Refuses to resume a run whose saved config.json differs (listing the keys) unless force."""
  path = os.path.join(output_dir, ckpt.CONFIG_FILE)
  if latest_checkpoint_on_disk(output_dir) is None or not os.path.exists(path):
    return
  with open(path) as f:
    old = rc.from_dict(json.load(f))
  changes = rc.diff(old, cfg)
  if changes and not force:
    lines = "\n".join(f"  {k}: {a!r} (saved) -> {b!r} (now)" for k, a, b in changes)
    raise TrainingError(f"output_dir {output_dir!r} holds a run with a different config; "
                        f"resume with the same config, another output_dir, or --force:\n{lines}")
  if changes:
    log.warning("resuming with %d changed config keys (--force): %s", len(changes),
                ", ".join(k for k, _, _ in changes))


def check_base(meta: dict, base_provenance: dict, step: int, output_dir: str,
               force: bool) -> None:
  """Refuses checkpoint `step` (its `meta`) unless it was trained on the base described by
  `base_provenance` (same weight fingerprint), or `force`."""
  saved = meta.get("base", {}).get("fingerprint")
  now = base_provenance["fingerprint"]
  if saved != now and not force:
    raise TrainingError(f"checkpoint {step} in {output_dir!r} was trained on a different base "
                        f"(fingerprint {saved} != {now}); use the same model.preset/hf_path/seed "
                        "(or base_params), or --force")


def restore_newest(manager, abstract_state, output_dir: str):
  """(step, state, data_state, meta) of the newest checkpoint that restores.

  Orbax only lists committed checkpoints, but a committed one can still be unreadable (a file
  truncated or damaged after the save). Then the one before is tried; once one restores, the
  newer unreadable ones are moved to output_dir/checkpoints_unreadable/ (kept for inspection,
  and out of the way of the run saving those steps again). If none restores, nothing is moved
  and TrainingError lists every failure.
  """
  failed: list[tuple[int, str]] = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, data_state, meta = ckpt.restore(manager, step, abstract_state)
    except Exception as e:  # noqa: BLE001 - damage surfaces as tensorstore/JSON/orbax errors
      first = (str(e).strip().splitlines() or [""])[0][:300]
      failed.append((step, f"{type(e).__name__}: {first}"))
      log.warning("checkpoint %d in %s is unreadable (%s); trying the one before", step,
                  manager.directory, failed[-1][1])
      continue
    if failed:
      _set_aside(manager, output_dir, [s for s, _ in failed])
    return step, state, data_state, meta
  lines = "\n".join(f"  step {s}: {why}" for s, why in failed)
  raise TrainingError(
      f"no checkpoint in {manager.directory} can be restored:\n{lines}\n(a config change that "
      "alters the trained state, e.g. lora.rank, cannot resume even with --force); move the "
      "checkpoints away to start over")


def _set_aside(manager, output_dir: str, steps: list[int]) -> None:
  """Moves checkpoint dirs `steps` to output_dir/checkpoints_unreadable/<step>[-<time>]."""
  if jax.process_index() == 0:
    root = os.path.join(output_dir, UNREADABLE_DIR)
    os.makedirs(root, exist_ok=True)
    for s in steps:
      dest = os.path.join(root, str(s))
      if os.path.exists(dest):
        dest += time.strftime("-%Y%m%dT%H%M%S")
      shutil.move(os.path.join(str(manager.directory), str(s)), dest)
      log.warning("moved unreadable checkpoint %d to %s", s, dest)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("lora_jax_set_aside_checkpoints")
  manager.reload()


@contextlib.contextmanager
def save_errors(manager):
  """A failed checkpoint write (disk full, a storage error; an async commit's error surfaces at
  the next save or wait) becomes a TrainingError naming the last complete checkpoint."""
  try:
    yield
  except TrainingError:
    raise
  except Exception as e:  # noqa: BLE001 - orbax re-raises the writer's error as is
    output_dir = os.path.dirname(str(manager.directory))
    raise TrainingError(
        f"saving a checkpoint in {manager.directory} failed ({type(e).__name__}: {e}); the last "
        f"complete checkpoint is {latest_checkpoint_on_disk(output_dir)}: free space or fix the "
        "output_dir, then run again to resume from it") from e
