"""File I/O for every read and write of run inputs and outputs: local paths and object stores
(gs://, through fsspec / gcsfs, the layer etils.epath and orbax use), atomic writes, and the one
JSON encoder.

Paths are strings; one with a URL scheme (`gs://bucket/run`) is remote, anything else local.
Local paths behave as they always did: a file write goes to a temporary file beside the target,
is flushed to disk, then renamed over it; a directory (an export) is built in a temp dir beside
the target, then renamed in. So a reader (or a crash) never sees a half-written file or
directory, and an existing one is never lost.

An object store has no rename, so there a write is "write the final object once": the bytes are
complete in memory or in a local file before the one upload request that creates the object (a
resumable upload only makes the object visible when its last chunk lands), so a reader sees the
old object or the new one, never a part; a failed upload leaves the old object. A directory
(`atomic_dir`) is built in a LOCAL temp dir and uploaded on success: the old commit files go
first, then every data file, then stale owned objects, and the commit files (`COMMIT_FILES`:
config.json, adapter_config.json, lora_jax.json, analysis.json, report.json) last, so a reader
that finds the commit file finds the data it describes; a failure in the writer uploads nothing.
A failure mid-upload leaves the directory without its commit file (incomplete, never a mix
that looks complete); writing it again completes it. `staged_dir` is the same for writers that
need a local directory (matplotlib, tensorboardX, numpy), without the owned-files checks.

JSON: `jsonable` turns numpy / jax scalars and arrays into Python numbers and lists, tuples into
lists, keys into strings and bytes into `{"__bytes_b64__": ...}` (which `loads` turns back into
bytes); `dumps` writes the result. Non-finite floats are written as one of three conventions,
because the files that hold them already promise one: "literal" (NaN / Infinity, Python's JSON),
"null" (strict JSON; metrics.jsonl), "strict" (NaN -> null, +-inf -> "inf" / "-inf", keeping the
sign; analysis.json).
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import fnmatch
import json
import math
import os
import re
import shutil
import tempfile
from typing import IO, Any, Iterator, Sequence

import numpy as np

_BYTES_TAG = "__bytes_b64__"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# The files whose presence marks a directory export as complete: uploaded last (see above).
COMMIT_FILES = ("config.json", "adapter_config.json", "lora_jax.json", "analysis.json",
                "report.json")


# --------------------------------------------------------------------------- paths
def is_remote(path) -> bool:
  """True for a URL (`gs://bucket/x`, any `scheme://`), False for a local path."""
  return bool(_URL.match(os.fspath(path)))


def as_path(path):
  """`path` as an etils.epath.Path (gs:// through fsspec, like orbax)."""
  from etils import epath
  return epath.Path(os.fspath(path))


def join(path, *parts) -> str:
  """os.path.join for local paths; for a URL, `/`-joined with its `scheme://` kept intact."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.join(path, *parts)
  for part in map(os.fspath, parts):
    path = part if is_remote(part) else path.rstrip("/") + "/" + part.lstrip("/")
  return path


def abspath(path) -> str:
  """os.path.abspath for local paths; a URL as it is."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def _fs(path):
  """(fsspec filesystem, path within it) of a remote path. The listings cache is off: orbax
  (tensorstore) and other processes write the same bucket, so a cached listing would be stale."""
  import fsspec
  return fsspec.core.url_to_fs(os.fspath(path), use_listings_cache=False)


def exists(path) -> bool:
  if not is_remote(path):
    return os.path.exists(path)
  fs, p = _fs(path)
  return fs.exists(p)


def isdir(path) -> bool:
  if not is_remote(path):
    return os.path.isdir(path)
  fs, p = _fs(path)
  return fs.isdir(p)


def isfile(path) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)
  fs, p = _fs(path)
  return fs.isfile(p)


def listdir(path) -> list[str]:
  """The names in directory `path`, sorted; FileNotFoundError naming it when there is none."""
  if not is_remote(path):
    return sorted(os.listdir(path))
  fs, p = _fs(path)
  p = p.rstrip("/")
  try:
    entries = fs.ls(p, detail=False)
  except FileNotFoundError:
    entries = []
  names = sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != p})
  if not names and not fs.isdir(p):
    raise FileNotFoundError(f"{path}: no such directory")
  return names


def makedirs(path) -> None:
  """os.makedirs(exist_ok=True); a no-op on an object store (directories are name prefixes)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def rmtree(path) -> None:
  """Removes a directory tree (or a file); a missing one is fine."""
  if not is_remote(path):
    _remove(path)
    return
  fs, p = _fs(path)
  if fs.exists(p):
    fs.rm(p, recursive=True)


def remove(path) -> None:
  """Removes one file (object); FileNotFoundError when missing."""
  if not is_remote(path):
    os.unlink(path)
    return
  fs, p = _fs(path)
  if not fs.isfile(p):
    raise FileNotFoundError(f"{path}: no such file")
  fs.rm_file(p)


def _same_kind(src, dst) -> bool:
  """True when both paths are remote; ValueError when one is local and the other remote."""
  if is_remote(src) != is_remote(dst):
    raise ValueError(f"({src}, {dst}): both paths must be local or both remote")
  return is_remote(src)


def copy_tree(src, dst, *, last: Sequence[str] = ()) -> None:
  """Copies file or tree `src` to `dst`; on an object store object by object, the files named
  in `last` (base names, e.g. orbax's commit marker) after all others, so an interrupted copy
  never looks complete."""
  if not _same_kind(src, dst):
    shutil.copytree(src, dst) if os.path.isdir(src) else shutil.copy2(src, dst)
    return
  fs, s = _fs(src)
  _, d = _fs(dst)
  s, d = s.rstrip("/"), d.rstrip("/")
  files = fs.find(s) if fs.isdir(s) else [s]
  for f in sorted(files, key=lambda f: f.rsplit("/", 1)[-1] in last):
    _copy_object(fs, f, d + f[len(s):])


def _copy_object(fs, src: str, dst: str) -> None:
  fs.copy(src, dst)  # a server-side copy: `dst` appears complete or not at all


def move(src, dst) -> None:
  """Moves file or tree `src` to a new `dst` (on an object store: copy every object, then
  delete the originals)."""
  if not _same_kind(src, dst):
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    shutil.move(src, dst)
    return
  copy_tree(src, dst)
  rmtree(src)


ORBAX_COMMIT_MARKER = "commit_success.txt"  # orbax: the last object of a step on an object store


def checkpoint_steps(directory) -> list[int]:
  """The complete orbax checkpoint steps in `directory`, sorted: locally the step dirs (orbax
  renames a finished temp dir to its step), on an object store the step prefixes holding
  orbax's commit marker (written there last, as there is no rename). [] when there is none."""
  if not isdir(directory):
    return []
  steps = [int(n) for n in listdir(directory) if n.isdigit()]
  if is_remote(directory):
    steps = [s for s in steps if exists(join(directory, str(s), ORBAX_COMMIT_MARKER))]
  return sorted(steps)


# --------------------------------------------------------------------------- reads
def open(path, mode: str = "r", **kwargs) -> IO:  # noqa: A001 - the builtin, for any path
  """builtins.open for local paths; remote paths open for reading only (write with the atomic
  writers: an object store has no append or in-place update)."""
  if not is_remote(path):
    return builtins.open(path, mode, **kwargs)
  if any(c in mode for c in "wax+"):
    raise ValueError(f"{path}: remote files open for reading only (mode {mode!r}); use "
                     "fileio.atomic_write_* or atomic_dir / staged_dir")
  fs, p = _fs(path)
  if not fs.isfile(p):
    raise FileNotFoundError(f"{path}: no such file")
  return fs.open(p, mode, **kwargs)


def read_bytes(path) -> bytes:
  if not is_remote(path):
    with builtins.open(path, "rb") as f:
      return f.read()
  fs, p = _fs(path)
  if not fs.isfile(p):
    raise FileNotFoundError(f"{path}: no such file")
  return fs.cat_file(p)


def read_text(path) -> str:
  return read_bytes(path).decode("utf-8")


def _download_tree(path: str, dest: str) -> None:
  fs, p = _fs(path)
  p = p.rstrip("/")
  for f in fs.find(p):
    rel = f[len(p):].lstrip("/")
    if not rel:
      continue
    local = os.path.join(dest, *rel.split("/"))
    os.makedirs(os.path.dirname(local), exist_ok=True)
    fs.get_file(f, local)


@contextlib.contextmanager
def local_copy(path) -> Iterator[str]:
  """Yields a local path holding `path`: the path itself when local; for a remote file or
  directory a downloaded copy (same base name, in a temp dir deleted afterwards)."""
  path = os.fspath(path)
  if not is_remote(path):
    yield path
    return
  fs, p = _fs(path)
  name = p.rstrip("/").rsplit("/", 1)[-1] or "root"
  tmp = tempfile.mkdtemp(prefix="lora_jax-download-")
  try:
    local = os.path.join(tmp, name)
    if fs.isfile(p):
      fs.get_file(p, local)
    elif fs.isdir(p):
      os.makedirs(local)
      _download_tree(path, local)
    else:
      raise FileNotFoundError(f"{path}: no such file or directory")
    yield local
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


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
  if not isfile(path):
    raise FileNotFoundError(f"{path}: {what} not found")
  try:
    obj = json.loads(read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
  return obj


# --------------------------------------------------------------------------- atomic files
def upload_file(local: str, path: str) -> None:
  """Copies local file `local` to remote `path` in one upload: the object appears complete or
  not at all (a failed upload leaves the previous object)."""
  fs, p = _fs(path)
  fs.put_file(local, p)


def atomic_write_bytes(path: str, data: bytes) -> None:
  if is_remote(path):
    fs, p = _fs(path)
    fs.pipe_file(p, bytes(data))  # one request creates the object, complete
    return
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
  if is_remote(path):
    if isfile(path):
      raise FileExistsError(f"{path}: exists and is not a directory; refusing to replace it")
    if not isdir(path):
      return None
    entries = listdir(path)
  else:
    if not os.path.lexists(path):
      return None
    if not os.path.isdir(path) or os.path.islink(path):
      raise FileExistsError(f"{path}: exists and is not a directory; refusing to replace it")
    entries = os.listdir(path)
  return sorted(e for e in entries if not any(fnmatch.fnmatchcase(e, pat) for pat in owned))


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
def atomic_dir(path: str, owned: Sequence[str], *, overwrite: bool = False,
               commit: Sequence[str] = COMMIT_FILES) -> Iterator[str]:
  """Yields a temp dir to build an export in; on success it becomes `path`, on error it is deleted.

  `owned`: name patterns (fnmatch) of the top-level entries this kind of export writes, e.g.
  ("config.json", "model*.safetensors*"). A missing, empty or own-output `path` is swapped for the
  new dir in one rename (a reader sees the old or the new export, never a mix). A `path` holding
  other files is refused unless `overwrite`; then each new entry is renamed in, stale owned entries
  are removed, and every foreign file stays where it was.

  A remote `path`: the temp dir is local and is uploaded on success, `commit` files last (see
  the module docstring); the owned / foreign rules are the same."""
  if is_remote(path):
    with _remote_atomic_dir(os.fspath(path), owned, overwrite, commit) as tmp:
      yield tmp
    return
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


def _local_files(root: str) -> list[str]:
  """Relative `/`-paths of the files under local dir `root`, sorted."""
  out = []
  for d, _, files in os.walk(root):
    rel = os.path.relpath(d, root)
    out += [f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}" for f in files]
  return sorted(out)


def upload_tree(local: str, path: str, *, last: Sequence[str] = ()) -> None:
  """Uploads every file under local dir `local` to remote dir `path`, each object once and
  complete; the top-level files named in `last` after all the others."""
  files = _local_files(local)
  for rel in sorted(files, key=lambda f: f in last):
    upload_file(os.path.join(local, *rel.split("/")), join(path, rel))


@contextlib.contextmanager
def _remote_atomic_dir(path: str, owned: Sequence[str], overwrite: bool,
                       commit: Sequence[str]) -> Iterator[str]:
  check_replaceable(path, owned, overwrite)
  tmp = tempfile.mkdtemp(prefix="lora_jax-export-")
  try:
    yield tmp
    check_replaceable(path, owned, overwrite)
    new = set(os.listdir(tmp))
    old = set(listdir(path)) if isdir(path) else set()
    for entry in sorted(old & set(commit)):  # first: the old export stops looking complete
      rmtree(join(path, entry))
    for entry in sorted(old & new):
      if os.path.isdir(os.path.join(tmp, entry)):  # a whole new tree: no stale objects in it
        rmtree(join(path, entry))
    upload_tree(tmp, path, last=commit)
    for entry in sorted(old - new):
      if any(fnmatch.fnmatchcase(entry, pat) for pat in owned):
        rmtree(join(path, entry))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


class Staging:
  """A local directory standing in for `path`: `upload()` copies its files to `path` (each
  object written once, complete); for a local `path`, `local` is `path` itself."""

  def __init__(self, path):
    self.path = os.fspath(path)
    self.remote = is_remote(self.path)
    if self.remote:
      self.local = tempfile.mkdtemp(prefix="lora_jax-staging-")
    else:
      self.local = self.path
      os.makedirs(self.local, exist_ok=True)

  def upload(self) -> None:
    if self.remote:
      upload_tree(self.local, self.path)

  def close(self) -> None:
    """Deletes the local stand-in of a remote `path` (without uploading)."""
    if self.remote:
      shutil.rmtree(self.local, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(path) -> Iterator[str]:
  """Yields a local directory for writers that need one (matplotlib, tensorboardX, numpy): `path`
  itself when local; for a remote `path` a temp dir whose files are uploaded to `path` when the
  block ends without error (each object once, complete), then deleted."""
  staging = Staging(path)
  try:
    yield staging.local
    staging.upload()
  finally:
    staging.close()


def write_json(path: str, obj: Any) -> None:
  """A JSON file inside a directory being built by `atomic_dir` (so not itself atomic)."""
  with builtins.open(path, "w") as f:
    f.write(dumps(obj, indent=2, sort_keys=True) + "\n")


def listed(items: list[str], limit: int = 20) -> str:
  """Items (file names) as indented lines for an error message, the first `limit` of them."""
  shown = items[:limit]
  more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return "".join(f"\n    {s}" for s in shown) + more
