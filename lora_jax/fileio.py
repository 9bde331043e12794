"""Atomic file writes and JSON encoding shared by every module that writes results.

A write goes to a temporary file beside the target, is flushed to disk, then renamed over it, so a
reader (or a crash) never sees a half-written file and an existing file is never lost.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np


def atomic_write_bytes(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def json_default(x: Any):
  """`json.dumps(default=...)` for numpy / jax scalars and arrays, and bytes."""
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.floating):
    return float(x)
  if hasattr(x, "tolist"):  # np.ndarray, np.generic, jax.Array
    return x.tolist()
  if isinstance(x, bytes):
    return x.decode("utf-8", errors="replace")
  raise TypeError(f"not JSON serializable: {type(x).__name__}")


def atomic_write_json(path: str, obj: Any, *, indent: int | None = 1, **kwargs) -> None:
  atomic_write_text(path, json.dumps(obj, indent=indent, default=json_default, **kwargs) + "\n")
