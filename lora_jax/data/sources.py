"""Record sources: jsonl / jsonl.gz, Parquet, ArrayRecord, TFDS and synthetic, as grain MapDatasets.

`load_records(data_cfg)` returns a `grain.MapDataset` of dicts. Every record carries `_where`
("file:line", "file:row N", "file:record N", "tfds:name[split]:example N") so later stages can name
the offending input. A record that cannot be parsed raises `DataError` naming file and line, or,
with `data.skip_malformed`, becomes `{"_where": ..., "_error": message}` for the pipeline to count
and drop. Records are read lazily by index: jsonl files are indexed by line offsets once (gzip
files are decompressed into memory), so shuffling and per-process slicing never parse the whole
corpus. Files may be local or on gs://: remote files are found with `fileio` (a glob, a
directory or a list) and staged once into a local temp dir (random access by record is what an
object store serves worst); `_where` still names the gs:// object.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import gzip
import json
import logging
import mmap
import os
import threading
import zlib
from typing import Any, Sequence

import grain
import numpy as np

from lora_jax import fileio
from lora_jax.data.errors import DataError, describe_type, lone_surrogate

log = logging.getLogger(__name__)

WHERE = "_where"  # provenance of a record, for error messages
ERROR = "_error"  # set on records that failed to parse (only with skip_malformed)

SOURCES = ("synthetic", "jsonl", "parquet", "arrayrecord", "tfds")
_EXTENSIONS = {
    "jsonl": (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson"),
    "parquet": (".parquet",),
    "arrayrecord": (".array_record", ".arrayrecord"),
}
_CHUNK = 1 << 26  # bytes scanned at a time when indexing newlines


def cfg_get(data_cfg, key: str, default):
  """`data_cfg.key`, or `default` for keys an older config does not define."""
  try:
    return data_cfg[key]
  except (KeyError, AttributeError):
    return default


def malformed(where: str, message: str, skip: bool) -> dict:
  """The record that replaces a bad one: raise, or mark it for skipping."""
  if not skip:
    raise DataError(where, message)
  return {WHERE: where, ERROR: message}


def parse_json_record(raw: bytes, where: str, skip: bool) -> dict:
  """One UTF-8 JSON object -> dict with `_where`."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return malformed(where, f"not valid UTF-8 text (binary data?) at byte {e.start}", skip)
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    return malformed(where, f"invalid JSON ({e.msg} at column {e.colno})", skip)
  if not isinstance(obj, dict):
    return malformed(where, f"expected a JSON object, got {describe_type(obj)}", skip)
  surrogate = lone_surrogate(text, obj)
  if surrogate:
    return malformed(where, surrogate, skip)
  obj[WHERE] = where
  return obj


def resolve_paths(spec: str, source: str, key: str = "data.path") -> list[str]:
  """A file, a comma-separated list, a glob or a directory -> sorted list of existing files."""
  parts = [p.strip() for p in str(spec or "").split(",") if p.strip()]
  if not parts:
    raise DataError(key, f"empty; data.source={source!r} needs a file, a comma-separated list "
                    "of files, a glob or a directory")
  paths = []
  for part in parts:
    part = part if fileio.is_remote(part) else os.path.expanduser(part)
    if glob.has_magic(part):
      matches = sorted(p for p in _glob(part) if fileio.isfile(p))
      if not matches:
        raise DataError(key, f"glob {part!r} matches no files")
      paths.extend(matches)
    elif fileio.isdir(part):
      exts = _EXTENSIONS[source]
      matches = sorted(fileio.join(part, n) for n in fileio.listdir(part) if n.endswith(exts))
      if not matches:
        raise DataError(key, f"directory {part!r} has no {'/'.join(exts)} files")
      paths.extend(matches)
    elif fileio.isfile(part):
      paths.append(part)
    else:
      raise DataError(key, f"{part}: no such file")
  return paths


def _glob(pattern: str) -> list[str]:
  """glob.glob for a local pattern; for gs:// the pattern's wildcard part is matched by epath."""
  if not fileio.is_remote(pattern):
    return glob.glob(pattern)
  parts = pattern.split("/")
  first = next(i for i, p in enumerate(parts) if glob.has_magic(p))
  root = "/".join(parts[:first])
  return [str(p) for p in fileio.as_path(root).glob("/".join(parts[first:]))]


_STAGED = contextlib.ExitStack()  # local copies of remote data files, kept while the process runs
_STAGED_COPIES: dict[str, str] = {}  # remote path -> its local copy
_STAGED_BY = os.getpid()
atexit.register(lambda: os.getpid() == _STAGED_BY and _STAGED.close())  # not in forked workers


def stage(paths: Sequence[str]) -> list[str]:
  """Local paths for `paths`: each remote file is downloaded once per process
  (`fileio.local_copy`) and kept until the process exits; local paths are returned as they are."""
  for p in paths:
    if fileio.is_remote(p) and p not in _STAGED_COPIES:
      _STAGED_COPIES[p] = _STAGED.enter_context(fileio.local_copy(p))
  return [_STAGED_COPIES.get(p, p) for p in paths]


class _MultiFile:
  """Random access over the records of several files, indexed by a global record number.

  `_paths` are the (local, maybe staged) files read, `_names` the paths errors and `_where` give."""

  def __init__(self, paths: Sequence[str], names: Sequence[str], counts: Sequence[int],
               skip: bool):
    self._paths, self._names = list(paths), list(names)
    self._ends = np.cumsum(np.asarray(counts, np.int64))
    self._skip = skip

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def _locate(self, index: int) -> tuple[int, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    fi = int(np.searchsorted(self._ends, index, side="right"))
    start = int(self._ends[fi - 1]) if fi else 0
    return fi, index - start


def _nonempty(paths, counts, skip: bool, what: str) -> list[int]:
  """Indices of the files that have records; empty files raise, or are skipped with a warning."""
  keep = []
  for i, (p, n) in enumerate(zip(paths, counts)):
    if n == 0:
      if not skip:
        raise DataError(p, f"empty file (no {what}); remove it or set data.skip_malformed=True")
      log.warning("%s: empty file (no %s), skipped", p, what)
    else:
      keep.append(i)
  return keep


def _line_index(buf) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(starts, ends, 1-based line numbers) of the non-blank lines of a bytes-like buffer."""
  arr = np.frombuffer(buf, np.uint8)
  newlines = [np.flatnonzero(arr[s:s + _CHUNK] == 10) + s for s in range(0, len(arr), _CHUNK)]
  nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
  starts = np.concatenate([[0], nl + 1]).astype(np.int64)
  ends = np.concatenate([nl, [len(arr)]]).astype(np.int64)
  lines = np.arange(1, len(starts) + 1, dtype=np.int64)
  lengths = ends - starts
  keep = lengths > 0
  for i in np.flatnonzero((lengths > 0) & (lengths <= 8)):  # whitespace-only short lines
    keep[i] = bool(bytes(arr[starts[i]:ends[i]]).strip())
  return starts[keep], ends[keep], lines[keep]


class JsonlSource(_MultiFile):
  """JSON-lines files (optionally gzip-compressed); one record per non-blank line."""

  def __init__(self, paths: Sequence[str], skip: bool = False):
    self._buffers, self._index = [], []
    counts = []
    names, paths = list(paths), stage(paths)
    for p, name in zip(paths, names):
      buf = self._load(p, name) if name.endswith(".gz") else None
      if buf is None:
        size = os.path.getsize(p)
        if size == 0:
          idx = (np.zeros(0, np.int64),) * 3
        else:
          with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            idx = _line_index(mm)
      else:
        idx = _line_index(buf)
      self._buffers.append(buf)
      self._index.append(idx)
      counts.append(len(idx[0]))
    keep = _nonempty(names, counts, skip, "JSON lines")
    self._buffers = [self._buffers[i] for i in keep]
    self._index = [self._index[i] for i in keep]
    super().__init__([paths[i] for i in keep], [names[i] for i in keep],
                     [counts[i] for i in keep], skip)
    self._fds, self._pid = {}, None

  @staticmethod
  def _load(path: str, name: str) -> bytes:
    try:
      with gzip.open(path, "rb") as f:
        return f.read()
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(name, f"not a valid gzip file ({e})") from e

  def _read(self, fi: int, start: int, end: int) -> bytes:
    buf = self._buffers[fi]
    if buf is not None:
      return buf[start:end]
    if self._pid != os.getpid():  # file descriptors do not survive fork/pickle
      self._fds, self._pid = {}, os.getpid()
    fd = self._fds.get(fi)
    if fd is None:
      fd = self._fds[fi] = os.open(self._paths[fi], os.O_RDONLY)
    return os.pread(fd, end - start, start)  # positional read: safe across reader threads

  def __getitem__(self, index: int) -> dict:
    fi, j = self._locate(int(index))
    starts, ends, lines = self._index[fi]
    raw = self._read(fi, int(starts[j]), int(ends[j]))
    return parse_json_record(raw, f"{self._names[fi]}:{int(lines[j])}", self._skip)

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_fds"], state["_pid"] = {}, None
    return state


class ParquetSource(_MultiFile):
  """Parquet files; one record per row (nested columns become lists / dicts)."""

  def __init__(self, paths: Sequence[str], skip: bool = False):
    import pyarrow.parquet as pq
    counts = []
    names, paths = list(paths), stage(paths)
    for p, name in zip(paths, names):
      try:
        counts.append(pq.ParquetFile(p).metadata.num_rows)
      except Exception as e:  # pyarrow raises ArrowInvalid / OSError on non-parquet bytes
        raise DataError(name, f"not a readable Parquet file ({e})") from e
    keep = _nonempty(names, counts, skip, "rows")
    super().__init__([paths[i] for i in keep], [names[i] for i in keep],
                     [counts[i] for i in keep], skip)
    self._tables: dict[int, Any] = {}
    self._lock = threading.Lock()

  def _table(self, fi: int):
    table = self._tables.get(fi)
    if table is None:
      import pyarrow.parquet as pq
      with self._lock:
        table = self._tables.get(fi)
        if table is None:
          try:
            table = self._tables[fi] = pq.read_table(self._paths[fi])
          except Exception as e:
            raise DataError(self._names[fi], f"cannot read Parquet data ({e})") from e
    return table

  def __getitem__(self, index: int) -> dict:
    fi, j = self._locate(int(index))
    row = self._table(fi).slice(j, 1).to_pylist()[0]
    row[WHERE] = f"{self._names[fi]}:row {j + 1}"
    return row

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_tables"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


class ArrayRecordSource(_MultiFile):
  """ArrayRecord files whose records are UTF-8 JSON objects."""

  def __init__(self, paths: Sequence[str], skip: bool = False):
    counts = []
    names, paths = list(paths), stage(paths)
    for p, name in zip(paths, names):
      reader = self._open(p, name)
      try:
        counts.append(reader.num_records())
        reader.close()
      except Exception as e:  # some corruptions only surface here
        raise DataError(name, f"not a readable ArrayRecord file ({e})") from e
    keep = _nonempty(names, counts, skip, "records")
    super().__init__([paths[i] for i in keep], [names[i] for i in keep],
                     [counts[i] for i in keep], skip)
    self._readers: dict[int, Any] = {}
    self._lock = threading.Lock()

  @staticmethod
  def _open(path: str, name: str):
    from array_record.python import array_record_module as arm
    try:
      return arm.ArrayRecordReader(path, options="readahead_buffer_size:0")
    except Exception as e:  # the reader raises RuntimeError/ValueError on foreign bytes
      raise DataError(name, f"not a readable ArrayRecord file ({e})") from e

  def __getitem__(self, index: int) -> dict:
    fi, j = self._locate(int(index))
    with self._lock:  # one reader per file, shared by reader threads
      reader = self._readers.get(fi)
      if reader is None:
        reader = self._readers[fi] = self._open(self._paths[fi], self._names[fi])
      raw = reader.read([j])[0]
    return parse_json_record(raw, f"{self._names[fi]}:record {j + 1}", self._skip)

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_readers"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


def _to_python(value):
  """TFDS numpy / bytes values -> str, int, float, list, dict."""
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      return value
  if isinstance(value, np.ndarray):
    return [_to_python(v) for v in value.tolist()] if value.ndim else _to_python(value.item())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, dict):
    return {k: _to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_python(v) for v in value]
  return value


class TfdsSource:
  """`tfds.data_source(name, split, data_dir)` (array_record-prepared datasets; no TensorFlow)."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    if not name:
      raise DataError("data.path", "empty; data.source='tfds' needs a TFDS dataset name "
                      "(e.g. 'mnist', 'huggingface:...')")
    import tensorflow_datasets as tfds
    self._label = f"tfds:{name}[{split}]"
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else "not found"
      raise DataError("data.path", f"TFDS dataset {name!r} not found ({first}); check the name "
                      f"and data.data_dir={data_dir!r}") from e
    except Exception as e:
      if "split" in str(e).lower():
        raise DataError("data.split", f"TFDS dataset {name!r} has no split {split!r} ({e})") from e
      raise DataError("data.path", f"cannot open TFDS dataset {name!r} split {split!r} "
                      f"(data.data_dir={data_dir!r}): {type(e).__name__}: {e}") from e

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict:
    record = _to_python(self._ds[int(index)])
    if not isinstance(record, dict):
      record = {"text": record}
    record[WHERE] = f"{self._label}:example {int(index) + 1}"
    return record


def make_source(data_cfg):
  """The random-access source (`__len__`, `__getitem__`) named by `data.source`."""
  source = str(cfg_get(data_cfg, "source", "synthetic"))
  skip = bool(cfg_get(data_cfg, "skip_malformed", False))
  if source == "synthetic":
    from lora_jax.data.synthetic import SyntheticSource
    return SyntheticSource(int(cfg_get(data_cfg, "synthetic_docs", 512)),
                           regime=str(cfg_get(data_cfg, "regime", "cpt")),
                           fmt=str(cfg_get(data_cfg, "format", "auto")),
                           text_field=str(cfg_get(data_cfg, "text_field", "text")))
  if source == "tfds":
    return TfdsSource(str(cfg_get(data_cfg, "path", "")), str(cfg_get(data_cfg, "split", "train")),
                      str(cfg_get(data_cfg, "data_dir", "")))
  classes = {"jsonl": JsonlSource, "parquet": ParquetSource, "arrayrecord": ArrayRecordSource}
  if source not in classes:
    raise DataError("data.source", f"unknown source {source!r}; expected one of {SOURCES}")
  paths = resolve_paths(cfg_get(data_cfg, "path", ""), source)
  return classes[source](paths, skip=skip)


def load_records(data_cfg) -> grain.MapDataset:
  """`data_cfg` (the run config's `data` section) -> MapDataset of record dicts with `_where`."""
  src = make_source(data_cfg)
  if len(src) == 0:
    raise DataError("data.path", f"no records in {cfg_get(data_cfg, 'path', '')!r} "
                    f"(data.source={cfg_get(data_cfg, 'source', '')!r})")
  return grain.MapDataset.source(src)
