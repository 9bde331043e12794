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
import logging
import os
import shutil
import time

import jax

from lora_jax import checkpoint as ckpt
from lora_jax import config as rc
from lora_jax import fileio
from lora_jax.training.errors import TrainingError

log = logging.getLogger(__name__)

UNREADABLE_DIR = "checkpoints_unreadable"


def check_output_dir(path: str, needed_bytes: int) -> None:
  """Raises TrainingError if output_dir cannot be created/written or lacks free space (an
  object store: a probe object is written and removed; it has no free-space limit to check)."""
  if fileio.is_remote(path):
    probe = fileio.join(path, f".write-probe-{os.getpid()}-{jax.process_index()}")
    try:
      fileio.atomic_write_bytes(probe, b"ok")
      fileio.remove(probe)
    except Exception as e:  # noqa: BLE001 - gcsfs raises OSError, HttpError, auth errors
      raise TrainingError(f"output_dir: cannot write to {path!r}: {type(e).__name__}: {e}"
                          ) from None
    return
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
  """The newest committed checkpoint step (a listing: no orbax manager needed)."""
  steps = fileio.checkpoint_steps(fileio.join(output_dir, ckpt.CHECKPOINT_DIR))
  return steps[-1] if steps else None


def check_resume_config(cfg, output_dir: str, force: bool) -> None:
  """Refuses to resume a run whose saved config.json differs (listing the keys) unless force."""
  path = fileio.join(output_dir, ckpt.CONFIG_FILE)
  if latest_checkpoint_on_disk(output_dir) is None or not fileio.exists(path):
    return
  old = rc.from_dict(fileio.read_json(path, "run config"))
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
    root = fileio.join(output_dir, UNREADABLE_DIR)
    fileio.makedirs(root)
    for s in steps:
      dest = fileio.join(root, str(s))
      if fileio.exists(dest):
        dest += time.strftime("-%Y%m%dT%H%M%S")
      fileio.move(fileio.join(str(manager.directory), str(s)), dest)
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
    output_dir = str(manager.directory).rstrip("/").rsplit("/", 1)[0]
    try:
      last = latest_checkpoint_on_disk(output_dir)
    except Exception as list_error:  # noqa: BLE001 - the storage may be down altogether
      last = f"unknown (listing failed: {type(list_error).__name__})"
    raise TrainingError(
        f"saving a checkpoint in {manager.directory} failed ({type(e).__name__}: {e}); the last "
        f"complete checkpoint is {last}: free space or fix the output_dir (or its storage), "
        "then run again to resume from it") from e
