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
import fnmatch
import json
import math
import os
import shutil
import tempfile
from typing import Any, Iterator, Sequence

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
def _foreign_entries(path: str, owned: Sequence[str]) -> list[str] | None:
  """Entries of an existing `path` that match none of the `owned` name patterns (None: no dir)."""
  if not os.path.lexists(path):
    return None
  if not os.path.isdir(path) or os.path.islink(path):
    raise FileExistsError(f"{path}: exists and is not a directory; refusing to replace it")
  return sorted(e for e in os.listdir(path)
                if not any(fnmatch.fnmatchcase(e, pat) for pat in owned))


def check_replaceable(path: str, owned: Sequence[str], overwrite: bool = False) -> list[str]:
  """The foreign entries of `path` (files no writer of this kind makes), which are kept.

  Raises FileExistsError if `path` is not a directory, or holds foreign entries and `overwrite` is
  false: a directory is written into only when it is missing, empty or this writer's own previous
  output, so a typo can never mix an export into (or wipe) an unrelated folder."""
  foreign = _foreign_entries(path, owned)
  if foreign and not overwrite:
    raise FileExistsError(
        f"{path}: directory holds files lora-jax did not write ({', '.join(foreign[:5])}"
        f"{', ...' if len(foreign) > 5 else ''}); refusing to write into it. Choose a new "
        "directory, or overwrite (--overwrite): lora-jax's files are replaced, the others kept")
  return foreign or []


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.unlink(path)


@contextlib.contextmanager
def atomic_dir(path: str, owned: Sequence[str], *, overwrite: bool = False) -> Iterator[str]:
  """Yields a temp dir to build an export in; on success it becomes `path`, on error it is deleted.

  `owned`: name patterns (fnmatch) of the top-level entries this kind of export writes, e.g.
  ("config.json", "model*.safetensors*"). A missing, empty or own-output `path` is swapped for the
  new dir in one rename (a reader sees the old or the new export, never a mix). A `path` holding
  other files is refused unless `overwrite`; then each new entry is renamed in, stale owned entries
  are removed, and every foreign file stays where it was."""
  path = os.path.abspath(path)
  check_replaceable(path, owned, overwrite)
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    yield tmp
    os.chmod(tmp, 0o777 & ~_umask())
    if check_replaceable(path, owned, overwrite):
      _merge_into(tmp, path, owned)
    elif os.path.lexists(path):
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


def _merge_into(tmp: str, path: str, owned: Sequence[str]) -> None:
  """Moves the new export's entries from `tmp` into `path`, drops the owned entries it no longer
  has (e.g. shards of an earlier, larger export) and keeps everything else."""
  new = set(os.listdir(tmp))
  for entry in sorted(new):
    target = os.path.join(path, entry)
    if os.path.isdir(target) and not os.path.islink(target):
      shutil.rmtree(target)
    os.replace(os.path.join(tmp, entry), target)
  for entry in os.listdir(path):
    if entry not in new and any(fnmatch.fnmatchcase(entry, pat) for pat in owned):
      _remove(os.path.join(path, entry))
  os.rmdir(tmp)


def write_json(path: str, obj: Any) -> None:
  """A JSON file inside a directory being built by `atomic_dir` (so not itself atomic)."""
  with open(path, "w") as f:
    f.write(dumps(obj, indent=2, sort_keys=True) + "\n")


def listed(items: list[str], limit: int = 20) -> str:
  """Items (file names) as indented lines for an error message, the first `limit` of them."""
  shown = items[:limit]
  more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return "".join(f"\n    {s}" for s in shown) + more
