"""`make_batch_iterator`: records -> shard -> shuffle -> epochs -> encode -> pack -> batch (grain).

Per process: records[process_index::process_count] (disjoint shards that cover the data), shuffled
by `seed` with a fresh permutation every epoch (grain's shuffle is keyed by epoch), repeated
`num_epochs` times (None: forever), encoded (CPT text + EOS, or IFT template + loss mask), packed
into rows of `seq_len` and batched. IFT with `data.packing_ratio` >= 1 packs each step's
int(ratio x batch) samples into one batch as LLM-Foundry does (`packing.RatioPackIterDataset`), so
an epoch is N // (ratio x batch) steps; otherwise `data.pack` chooses "whole" or "single". Packing runs over the epoch stream, so with several epochs a row
may hold the end of one epoch and the start of the next. The iterator state (grain's, plus the
packer's position inside a document) is a small JSON-serializable dict; restoring it continues with
the exact next batch. With `data.num_workers > 0` rows are built in grain worker processes (each
packs its own slice of the records): the order then depends on the worker count but stays
deterministic and checkpointable.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grain
import numpy as np

from lora_jax.data import formats
from lora_jax.data.errors import DataError
from lora_jax.data.packing import STAT_KEYS, PackIterDataset, RatioPackIterDataset
from lora_jax.data.sources import ERROR, WHERE, cfg_get, load_records

log = logging.getLogger(__name__)

_STATE_VERSION = 1
_MAX_SKIP_WARNINGS = 5


def _ensure_absl_flags_parsed():
  """grain's worker processes read absl flags; our CLI is not an absl app, so use defaults."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class EncodeRecord:
  """Record dict -> {"ids", "mask", "truncated", "where"} or {"skip": 1} (malformed, skipped)."""

  def __init__(self, tokenizer, *, regime: str, fmt: str, text_field: str, add_bos: bool,
               seq_len: int, skip_malformed: bool):
    self.tokenizer, self.regime, self.fmt = tokenizer, regime, fmt
    self.text_field, self.add_bos, self.seq_len = text_field, add_bos, seq_len
    self.skip_malformed = skip_malformed
    self._warned = 0

  def _skip(self, where: str, message: str) -> dict:
    if self._warned < _MAX_SKIP_WARNINGS:
      self._warned += 1
      more = "" if self._warned < _MAX_SKIP_WARNINGS else " (further ones are only counted)"
      log.warning("skipping malformed record %s: %s%s", where, message, more)
    return {"skip": 1}

  def __call__(self, record: dict) -> dict:
    where = str(record.get(WHERE, "?"))
    if ERROR in record:
      return self._skip(where, record[ERROR])
    try:
      if self.regime == "cpt":
        ids_T, mask_T = formats.encode_cpt_example(record, self.tokenizer, self.text_field,
                                                   add_bos=self.add_bos)
      else:
        ids_T, mask_T = formats.encode_ift_example(record, self.tokenizer, self.fmt,
                                                   add_bos=self.add_bos)
    except DataError as e:
      if not self.skip_malformed or e.where == "data.format":
        raise
      return self._skip(e.where, e.message)
    truncated = 0
    if self.regime == "ift" and len(ids_T) > self.seq_len:
      truncated = len(ids_T)
      ids_T, mask_T = ids_T[:self.seq_len], mask_T[:self.seq_len]
    return {"ids": ids_T, "mask": mask_T, "truncated": truncated, "where": where}


class BatchIterator:
  """Iterable of batch dicts (int32 [B, L]: tokens, positions, segment_ids, loss_mask).

  `get_state()` / `set_state(state)` checkpoint the position (state is a JSON-serializable dict;
  `set_state` also takes its JSON string/bytes). `stats` counts what the batches delivered so far
  hold: documents, skipped (malformed), truncated (IFT samples cut to seq_len), tokens (real, not
  padding) and batches. `batches_per_epoch` (lazy, one pass over all shards) is the number of
  global batches in one epoch: rows of epoch 0 summed over all processes // (batch_size *
  process_count), the same on every process; `epoch_stats` holds that pass's counts.
  """

  def __init__(self, data_cfg, tokenizer, *, seq_len: int, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, num_epochs: int | None = None):
    self.regime = str(cfg_get(data_cfg, "regime", "cpt"))
    if self.regime not in ("cpt", "ift"):
      raise DataError("data.regime", f"expected 'cpt' or 'ift', got {self.regime!r}")
    if seq_len <= 1:
      raise ValueError(f"seq_len must be > 1, got {seq_len}")
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
    fmt = str(cfg_get(data_cfg, "format", "auto"))
    if self.regime == "ift" and fmt != "auto":
      formats.detect_format({}, fmt)  # raises on an unknown data.format
    self._cfg = data_cfg
    self._tokenizer = tokenizer
    self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.num_epochs = num_epochs
    self._records = load_records(data_cfg)
    if len(self._records) < process_count:
      raise DataError("data.path", f"{len(self._records)} records cannot be split over "
                      f"{process_count} processes")
    self._encode = EncodeRecord(
        tokenizer, regime=self.regime, fmt=fmt,
        text_field=str(cfg_get(data_cfg, "text_field", "text")),
        add_bos=bool(cfg_get(data_cfg, "add_bos", True)), seq_len=self.seq_len,
        skip_malformed=bool(cfg_get(data_cfg, "skip_malformed", False)))
    self._packing_ratio = float(cfg_get(data_cfg, "packing_ratio", 0.0))
    if self._packing_ratio and not (self.regime == "ift" and self._packing_ratio >= 1):
      raise DataError("data.packing_ratio", f"{self._packing_ratio} must be 0 (off) or >= 1, "
                      "and only applies to IFT (CPT documents are always packed whole)")
    if self.regime == "cpt":
      self._mode = "split"
    elif self._packing_ratio:
      self._mode = "ratio"
    else:
      self._mode = "whole" if bool(cfg_get(data_cfg, "pack", True)) else "single"
    workers = int(cfg_get(data_cfg, "num_workers", 0))
    rows = self._rows(self.process_index, num_epochs, workers)
    self._it = rows.batch(self.batch_size, drop_remainder=True).__iter__()
    self._stats = dict.fromkeys(STAT_KEYS + ("batches",), 0)
    self._batches_per_epoch: int | None = None
    self.epoch_stats: dict[str, int] | None = None

  def _rows(self, shard: int, num_epochs: int | None, workers: int) -> grain.IterDataset:
    ds = self._records[shard::self.process_count]
    if bool(cfg_get(self._cfg, "shuffle", True)):
      ds = ds.shuffle(seed=self.seed)
    if num_epochs != 1:
      ds = ds.repeat(num_epochs)
    ds = ds.map(self._encode)
    if self._mode == "ratio":
      it = RatioPackIterDataset(ds, self.seq_len, self._tokenizer.pad_id, self.batch_size,
                                self._packing_ratio)
    else:
      it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
      it = PackIterDataset(it, self.seq_len, self._tokenizer.pad_id, self._mode)
    if workers > 0:
      _ensure_absl_flags_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    for k in STAT_KEYS:
      self._stats[k] += int(np.sum(batch.pop(f"_{k}")))
    self._stats["batches"] += 1
    return batch

  @property
  def stats(self) -> dict[str, int]:
    return dict(self._stats)

  def _fingerprint(self) -> dict[str, Any]:
    out = {"seq_len": self.seq_len, "batch_size": self.batch_size, "seed": self.seed,
           "process_index": self.process_index, "process_count": self.process_count,
           "num_records": len(self._records), "mode": self._mode}
    if self._mode == "ratio":
      out["packing_ratio"] = self._packing_ratio
    return out

  def get_state(self) -> dict[str, Any]:
    return {"version": _STATE_VERSION, "config": self._fingerprint(),
            "pipeline": self._it.get_state(), "stats": dict(self._stats)}

  def set_state(self, state: dict | str | bytes):
    if isinstance(state, (str, bytes)):
      state = json.loads(state)
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"data iterator state version {state.get('version')!r} != "
                       f"{_STATE_VERSION}")
    want = self._fingerprint()
    got = state.get("config", {})
    diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    if diff:
      raise DataError("data", "iterator state was saved by a different pipeline "
                      + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
    self._it.set_state(state["pipeline"])
    self._stats = {k: int(state["stats"].get(k, 0)) for k in self._stats}

  @property
  def batches_per_epoch(self) -> int:
    """Global batches (batch_size * process_count rows) in one epoch, rounded down (0 when an
    epoch is smaller than one global batch); computed once, lazily."""
    if self._batches_per_epoch is None:
      rows, stats = 0, dict.fromkeys(STAT_KEYS, 0)
      for shard in range(self.process_count):
        for row in self._rows(shard, 1, 0):
          rows += 1
          for k in STAT_KEYS:
            stats[k] += int(row[f"_{k}"])
      self.epoch_stats = {**stats, "rows": rows}
      if stats["truncated"]:
        log.warning("%d of %d samples per epoch are longer than seq_len=%d and were truncated",
                    stats["truncated"], stats["documents"], self.seq_len)
      global_batch = self.batch_size * self.process_count
      if rows < global_batch:  # 0: a step-count run still works; an epoch-count run cannot
        log.warning("data.path: one epoch packs into %d rows of seq_len=%d, fewer than one "
                    "global batch (%d): batches_per_epoch is 0", rows, self.seq_len, global_batch)
      self._batches_per_epoch = rows // global_batch
    return self._batches_per_epoch

  def close(self):
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def make_batch_iterator(data_cfg, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        num_epochs: int | None = None) -> BatchIterator:
  """The training batch stream for one process; see `BatchIterator`."""
  return BatchIterator(data_cfg, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                       process_index=process_index, process_count=process_count,
                       num_epochs=num_epochs)
