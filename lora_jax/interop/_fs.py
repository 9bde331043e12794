"""Atomic directory writes: build the output in a temp dir beside the target, then rename it in.

A reader never sees a half-written checkpoint, and a failure leaves whatever was at the target
before untouched. An existing target is only replaced when it looks like the same kind of artifact
(it holds `marker`, e.g. `config.json`) or is empty, so a typo can never wipe an unrelated folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator


def check_replaceable(path: str, marker: str) -> None:
  """Raises FileExistsError if `path` exists and is not an empty dir or a dir holding `marker`."""
  if not os.path.lexists(path):
    return
  if not os.path.isdir(path) or os.path.islink(path):
    raise FileExistsError(f"{path}: exists and is not a directory; refusing to replace it")
  entries = os.listdir(path)
  if entries and marker not in entries:
    raise FileExistsError(f"{path}: directory exists, is not empty and has no {marker}; "
                          "refusing to replace it (choose a new output directory)")


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_dir(path: str, marker: str) -> Iterator[str]:
  """Yields a temp dir; on success it replaces `path`, on error it is deleted."""
  path = os.path.abspath(path)
  check_replaceable(path, marker)
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    yield tmp
    os.chmod(tmp, 0o777 & ~_umask())
    check_replaceable(path, marker)
    if os.path.lexists(path):
      old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
      os.rmdir(old)
      os.rename(path, old)
      try:
        os.rename(tmp, path)
      except BaseException:
        os.rename(old, path)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def read_json(path: str, what: str) -> dict:
  """Reads a JSON object; missing file -> FileNotFoundError, bad JSON -> ValueError, both naming it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: {what} not found")
  try:
    with open(path) as f:
      obj = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
  return obj


def listed(items: list[str], limit: int = 20) -> str:
  """Items as indented lines for an error message, the first `limit` of them."""
  shown = items[:limit]
  more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return "".join(f"\n    {s}" for s in shown) + more
