"""File I/O shared by every module that writes results: atomic writes and the one JSON encoder.

A file write goes to a temporary file beside the target, is flushed to disk, then renamed over it;
a directory (an export) is built in a temp dir beside the target, then renamed in. So a reader (or
a crash) never sees a half-written file or directory, and an existing one is never lost.

JSON: `jsonable` turns numpy / jax scalars and arrays into Python numbers and lists, tuples into
lists, keys into strings and bytes into `{"__bytes_b64__": ...}` (which `loads` turns back into
bytes); `dumps` writes the result. Non-finite floats are written as one of three conventions,
because the files that hold them already promise one: "literal" (NaN / Infinity, Python's JSON),
"null" (strict JSON; metrics.jsonl), "strict" (NaN -> null, +-inf -> "inf" / "-inf", keeping the
sign; analysis.json).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np

_BYTES_TAG = "__bytes_b64__"


# --------------------------------------------------------------------------- JSON
def _nonfinite(x: float, nonfinite: str):
  if nonfinite == "literal":
    return x
  if nonfinite == "null" or math.isnan(x):
    return None
  return "inf" if x > 0 else "-inf"


def _key(k) -> str:
  if isinstance(k, str):
    return k
  if isinstance(k, np.generic):
    k = k.item()
  return json.dumps(k) if isinstance(k, (bool, type(None))) else str(k)


def jsonable(x: Any, *, nonfinite: str = "literal") -> Any:
  """`x` as plain JSON types (see the module docstring); `nonfinite`: literal, null or strict."""
  if isinstance(x, dict):
    return {_key(k): jsonable(v, nonfinite=nonfinite) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v, nonfinite=nonfinite) for v in x]
  if isinstance(x, bytes):
    return {_BYTES_TAG: base64.b64encode(x).decode()}
  if isinstance(x, (str, bool, int, type(None))):
    return x
  if isinstance(x, float):
    return x if math.isfinite(x) else _nonfinite(x, nonfinite)
  if isinstance(x, np.generic):
    return jsonable(x.item(), nonfinite=nonfinite)
  if hasattr(x, "__array__"):  # np.ndarray, jax.Array
    return jsonable(np.asarray(x).tolist(), nonfinite=nonfinite)
  raise TypeError(f"not JSON serializable: {type(x).__name__}")


def dumps(x: Any, *, indent: int | None = None, sort_keys: bool = False,
          nonfinite: str = "literal") -> str:
  return json.dumps(jsonable(x, nonfinite=nonfinite), indent=indent, sort_keys=sort_keys,
                    allow_nan=nonfinite == "literal")


def _unbytes(d: dict):
  if set(d) == {_BYTES_TAG}:
    return base64.b64decode(d[_BYTES_TAG])
  return d


def loads(text: str | bytes) -> Any:
  """Inverse of `dumps` (bytes come back as bytes)."""
  return json.loads(text, object_hook=_unbytes)


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


# --------------------------------------------------------------------------- atomic files
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


def atomic_write_json(path: str, obj: Any, *, indent: int | None = 1, sort_keys: bool = False,
                      nonfinite: str = "literal") -> None:
  atomic_write_text(path, dumps(obj, indent=indent, sort_keys=sort_keys, nonfinite=nonfinite)
                    + "\n")


# --------------------------------------------------------------------------- atomic directories
def check_replaceable(path: str, marker: str) -> None:
  """Raises FileExistsError if `path` exists and is not an empty dir or a dir holding `marker`, so
  a typo can never wipe an unrelated folder."""
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
  """Yields a temp dir; on success it replaces `path`, on error it is deleted. An existing `path`
  is only replaced when it is empty or holds `marker` (the same kind of artifact)."""
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
  """A JSON file inside a directory being built by `atomic_dir` (so not itself atomic)."""
  with open(path, "w") as f:
    f.write(dumps(obj, indent=2, sort_keys=True) + "\n")


def listed(items: list[str], limit: int = 20) -> str:
  """Items (file names) as indented lines for an error message, the first `limit` of them."""
  shown = items[:limit]
  more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return "".join(f"\n    {s}" for s in shown) + more
