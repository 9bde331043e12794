"""Packing tokenized documents into fixed-length rows with segment ids and per-segment positions.

A row is four int32 [L] arrays: `tokens`, `positions` (0 at each segment start), `segment_ids`
(1..n within the row, 0 = padding) and `loss_mask`. Modes:
  "split"   CPT: documents are concatenated greedily; a document longer than the space left in a
            row continues in the next row as a new segment (its positions restart at 0, and its
            first token there is not predicted, because predictions never cross segments).
  "whole"   IFT packed: whole samples (already truncated to L) are placed greedily in order; a
            sample that does not fit closes the row (padding the rest) and starts the next one.
  "single"  IFT unpacked: one sample per row, padded.
  "ratio"   IFT packed as LLM-Foundry's `packing_ratio`: each step reads round(ratio x rows)
            samples and bin-packs them, with the bins left over from earlier steps, first-fit
            decreasing into `rows` rows (`first_fit_decreasing`); the fullest rows are emitted, up
            to 10 x rows leftover bins wait for the next step, the rest are dropped. An epoch
            is then N // round(ratio x rows) steps, as the paper's step counts.
`Packer` is shared by the pure `pack_documents` and the checkpointable `PackIterDataset`;
`RatioPackIterDataset` implements "ratio" over an indexable dataset of encoded samples.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Sequence

import grain
import numpy as np

log = logging.getLogger(__name__)

MODES = ("split", "whole", "single")
ROW_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")
STAT_KEYS = ("documents", "skipped", "truncated", "tokens")  # carried in rows as "_<name>"


class _Row:
  """One row being filled."""

  def __init__(self, seq_len: int, pad_id: int):
    self.seq_len, self.pad_id = seq_len, pad_id
    self.tokens_L = np.full(seq_len, pad_id, np.int32)
    self.positions_L = np.zeros(seq_len, np.int32)
    self.segment_ids_L = np.zeros(seq_len, np.int32)
    self.loss_mask_L = np.zeros(seq_len, np.int32)
    self.fill = 0
    self.segments = 0
    self.stats = dict.fromkeys(STAT_KEYS, 0)

  def room(self) -> int:
    return self.seq_len - self.fill

  def append(self, ids_T: np.ndarray, mask_T: np.ndarray):
    n = len(ids_T)
    s = slice(self.fill, self.fill + n)
    self.segments += 1
    self.tokens_L[s] = ids_T
    self.loss_mask_L[s] = mask_T
    self.positions_L[s] = np.arange(n, dtype=np.int32)
    self.segment_ids_L[s] = self.segments
    self.fill += n
    self.stats["tokens"] += n

  def emit(self) -> dict[str, np.ndarray]:
    row = {"tokens": self.tokens_L, "positions": self.positions_L,
           "segment_ids": self.segment_ids_L, "loss_mask": self.loss_mask_L}
    row.update({f"_{k}": np.asarray(v, np.int32) for k, v in self.stats.items()})
    return row


class Packer:
  """Greedy, order-preserving packer over a stream of encoded documents.

  A document is a dict {"ids", "mask"} (int32 [T]) with optional "truncated" (original length,
  0 if not truncated), or {"skip": 1} for a malformed record, which is only counted. `pull()`
  returns (document, token) or None at the end of the stream; the token (e.g. the upstream
  iterator state before the document) is kept as `cur_token` while the document is only partly
  placed, so a caller can checkpoint at row boundaries as (cur_token, offset).
  """

  def __init__(self, seq_len: int, pad_id: int, mode: str = "split"):
    if mode not in MODES:
      raise ValueError(f"packing mode {mode!r} not in {MODES}")
    if seq_len <= 0:
      raise ValueError(f"seq_len must be positive, got {seq_len}")
    self.seq_len, self.pad_id, self.mode = seq_len, pad_id, mode
    self.cur: dict | None = None  # document partly (or not yet) placed
    self.cur_token: Any = None
    self.offset = 0  # tokens of `cur` already placed in earlier rows
    self.warned_truncation = False

  def resume(self, doc: dict, token: Any, offset: int):
    self.cur, self.cur_token, self.offset = doc, token, offset

  def next_row(self, pull: Callable[[], tuple[dict, Any] | None]) -> dict | None:
    """The next full (or final, padded) row, or None when the stream is exhausted."""
    row = _Row(self.seq_len, self.pad_id)
    while True:
      if self.cur is None:
        got = pull()
        if got is None:
          return row.emit() if row.fill else None
        doc, token = got
        if "skip" in doc:
          row.stats["skipped"] += 1
          continue
        self.cur, self.cur_token, self.offset = doc, token, 0
      ids_T, mask_T = self.cur["ids"], self.cur["mask"]
      if self.mode == "split":
        take = min(row.room(), len(ids_T) - self.offset)
        self._place(row, ids_T[self.offset:self.offset + take],
                    mask_T[self.offset:self.offset + take])
        self.offset += take
        if self.offset == len(ids_T):
          self.cur = None
        if row.room() == 0:
          return row.emit()
      elif len(ids_T) <= row.room():
        self._place(row, ids_T, mask_T)
        self.cur = None
        if self.mode == "single" or row.room() == 0:
          return row.emit()
      elif row.fill == 0:
        raise ValueError(f"a document of {len(ids_T)} tokens does not fit seq_len={self.seq_len} "
                         "(mode 'whole'/'single' needs documents truncated to seq_len)")
      else:
        return row.emit()  # `cur` starts the next row

  def _place(self, row: _Row, ids_T: np.ndarray, mask_T: np.ndarray):
    if self.offset == 0:  # count a document once, in the row holding its first token
      row.stats["documents"] += 1
      truncated = int(self.cur.get("truncated", 0))
      if truncated:
        row.stats["truncated"] += 1
        if not self.warned_truncation:
          self.warned_truncation = True
          log.warning("%s: sample of %d tokens truncated to seq_len=%d; further truncations are "
                      "only counted (pipeline stats['truncated'])",
                      self.cur.get("where", "?"), truncated, self.seq_len)
    row.append(ids_T, mask_T)


def pack_documents(token_lists: Iterable[Sequence[int]], seq_len: int, *,
                   mask_lists: Iterable[Sequence[int]] | None = None, pad_id: int = 0,
                   mode: str = "split") -> dict[str, np.ndarray]:
  """Pack documents into rows; returns `tokens`, `positions`, `segment_ids`, `loss_mask` [N, L].

  `mask_lists` defaults to all ones (CPT). mode: "split" (CPT), "whole" (packed IFT), "single".
  """
  token_lists = [np.asarray(t, np.int32) for t in token_lists]
  masks = ([np.ones(len(t), np.int32) for t in token_lists] if mask_lists is None
           else [np.asarray(m, np.int32) for m in mask_lists])
  if len(masks) != len(token_lists) or any(len(m) != len(t) for m, t in zip(masks, token_lists)):
    raise ValueError("mask_lists must match token_lists in number and lengths")
  docs = iter([{"ids": t, "mask": m} for t, m in zip(token_lists, masks) if len(t)])

  def pull():
    doc = next(docs, None)
    return None if doc is None else (doc, None)

  packer = Packer(seq_len, pad_id, mode)
  rows = []
  while (row := packer.next_row(pull)) is not None:
    rows.append(row)
  return {k: (np.stack([r[k] for r in rows]) if rows else np.zeros((0, seq_len), np.int32))
          for k in ROW_KEYS}


class _PackIterator(grain.DatasetIterator):
  """Checkpointable at row boundaries: state = upstream state before the document that starts
  the next row, plus how many of its tokens earlier rows already hold."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, mode: str):
    super().__init__(parent)
    self._packer = Packer(seq_len, pad_id, mode)

  def _pull(self):
    state = self._parent.get_state()
    try:
      return next(self._parent), state
    except StopIteration:
      return None

  def __next__(self) -> dict:
    row = self._packer.next_row(self._pull)
    if row is None:
      raise StopIteration
    return row

  def get_state(self) -> dict:
    if self._packer.cur is None:
      return {"parent": self._parent.get_state(), "offset": 0}
    return {"parent": self._packer.cur_token, "offset": int(self._packer.offset)}

  def set_state(self, state: dict):
    self._parent.set_state(state["parent"])
    self._packer.cur = None
    if state["offset"]:
      got = self._pull()
      if got is None:
        raise ValueError("data iterator state points past the end of the data")
      self._packer.resume(got[0], state["parent"], int(state["offset"]))


class PackIterDataset(grain.IterDataset):
  """Encoded documents ({"ids", "mask"} or {"skip"}) -> packed rows (see module docstring)."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int, mode: str = "split"):
    super().__init__(parent)
    if mode not in MODES:
      raise ValueError(f"packing mode {mode!r} not in {MODES}")
    self._seq_len, self._pad_id, self._mode = seq_len, pad_id, mode

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id, self._mode)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._seq_len}, mode={self._mode})"


# --------------------------------------------------------------------------- packing_ratio
Bin = tuple[int, list[int]]  # (tokens in the bin, item ids in the order they were added)


def first_fit_decreasing(sizes: Sequence[int], ids: Sequence[int], num_bins: int,
                         max_bin_size: int, bins: Sequence[Bin] = ()) -> tuple[list[Bin],
                                                                                list[Bin]]:
  """LLM-Foundry's `first_fit_bin_packing` on sizes: (the `num_bins` fullest bins, the rest).

  Items go longest first (ties keep their order) into the first of `bins` (earlier leftovers
  first) with room, else into a new bin; once only as many items remain as bins are missing,
  each takes its own bin, so at least `num_bins` bins come out when there are enough items.
  """
  bins = [(n, list(members)) for n, members in bins]
  items = sorted(zip(sizes, ids), key=lambda x: -x[0])
  for i, (size, item) in enumerate(items):
    if len(items) - i <= max(0, num_bins - len(bins)):
      bins.append((size, [item]))
      continue
    for b, (n, members) in enumerate(bins):
      if n + size <= max_bin_size:
        bins.pop(b)
        bins.append((n + size, members + [item]))
        break
    else:
      bins.append((size, [item]))
  bins.sort(key=lambda x: -x[0])
  return bins[:num_bins], bins[num_bins:]


def samples_per_step(packing_ratio: float, rows: int) -> int:
  """Samples read per step (LLM-Foundry: int(packing_ratio * device batch size))."""
  return int(packing_ratio * rows)


def ratio_steps_per_epoch(num_samples: int, packing_ratio: float, rows: int) -> int:
  """Steps in one epoch of `num_samples` (the last incomplete step is dropped, drop_last)."""
  return num_samples // samples_per_step(packing_ratio, rows)


class _RatioPackIterator(grain.DatasetIterator):
  """State: the index of the step being emitted, the leftover bins it started from (lists of
  sample indices: small ints into the parent dataset, so the state stays JSON and the samples
  are re-read on restore) and how many of its rows were already taken (grain's worker processes
  take the state after every row)."""

  def __init__(self, parent: grain.MapDataset, seq_len: int, pad_id: int, rows: int,
               per_step: int, max_leftover: int):
    super().__init__()
    self._samples, self._seq_len, self._pad_id = parent, seq_len, pad_id
    self._rows, self._per_step, self._max_leftover = rows, per_step, max_leftover
    self._step, self._leftover = 0, []
    self._cache: dict[int, dict] = {}  # the samples in leftover bins
    self._pending: list[dict] = []  # rows of step `self._step - 1` not yet taken
    self._started_from: list[list[int]] = []  # the leftover bins that step started from
    self._warned_drop = False

  def _sample(self, index: int) -> dict:
    return self._samples[index]

  def _pack_step(self) -> list[dict]:
    start = self._step * self._per_step
    indices = list(range(start, start + self._per_step))
    if len(self._samples) < start + self._per_step:  # drop_last: no incomplete step
      raise StopIteration
    samples = {i: self._sample(i) for i in indices}
    skipped = [i for i in indices if "skip" in samples[i]]
    real = [i for i in indices if "skip" not in samples[i]]
    for i in real:
      if len(samples[i]["ids"]) > self._seq_len:
        raise ValueError(f"a sample of {len(samples[i]['ids'])} tokens does not fit "
                         f"seq_len={self._seq_len}; IFT samples are truncated before packing")
    packed, leftover = first_fit_decreasing([len(samples[i]["ids"]) for i in real], real,
                                            self._rows, self._seq_len, self._leftover_bins())
    if len(leftover) > self._max_leftover and not self._warned_drop:
      self._warned_drop = True
      log.warning("packing_ratio: more leftover bins than %d; the emptiest are dropped (further "
                  "drops are not reported)", self._max_leftover)
    self._leftover = [members for _, members in leftover[:self._max_leftover]]
    known = {**self._cache, **samples}
    self._cache = {i: known[i] for members in self._leftover for i in members}
    self._step += 1
    out = []
    for r, (_, members) in enumerate(packed):
      row = _Row(self._seq_len, self._pad_id)
      for i in members:
        doc = known[i]
        row.append(doc["ids"], doc["mask"])
        row.stats["documents"] += 1
        row.stats["truncated"] += int(bool(doc.get("truncated", 0)))
      if r == 0:
        row.stats["skipped"] += len(skipped)
      out.append(row.emit())
    while len(out) < self._rows:  # fewer samples than rows: padding rows keep the batch shape
      out.append(_Row(self._seq_len, self._pad_id).emit())
    return out

  def _leftover_bins(self) -> list[Bin]:
    for i in (i for members in self._leftover for i in members if i not in self._cache):
      self._cache[i] = self._sample(i)  # after a restore
    return [(sum(len(self._cache[i]["ids"]) for i in members), list(members))
            for members in self._leftover]

  def __next__(self) -> dict:
    if not self._pending:
      self._started_from = [list(m) for m in self._leftover]
      self._pending = self._pack_step()
    return self._pending.pop(0)

  def get_state(self) -> dict:
    if self._pending:  # inside a step: replay it from its start and skip the rows taken
      return {"step": self._step - 1, "leftover": self._started_from,
              "taken": self._rows - len(self._pending)}
    return {"step": self._step, "leftover": [list(map(int, m)) for m in self._leftover],
            "taken": 0}

  def set_state(self, state: dict):
    self._step = int(state["step"])
    self._leftover = [list(map(int, m)) for m in state["leftover"]]
    self._cache, self._pending = {}, []
    for _ in range(int(state.get("taken", 0))):
      next(self)


class RatioPackIterDataset(grain.IterDataset):
  """Encoded samples (an indexable dataset of {"ids", "mask"} or {"skip"}) -> rows, `rows` per
  step from int(packing_ratio x rows) samples (see the module docstring, mode "ratio")."""

  def __init__(self, parent: grain.MapDataset, seq_len: int, pad_id: int, rows: int,
               packing_ratio: float, max_leftover_bins: int | None = None):
    super().__init__(parent)  # a parent lets grain's worker processes slice the samples
    if not packing_ratio >= 1 or not math.isfinite(packing_ratio):
      raise ValueError(f"packing_ratio must be >= 1, got {packing_ratio}")
    self._samples = parent
    self._args = (seq_len, pad_id, rows, samples_per_step(packing_ratio, rows),
                  10 * rows if max_leftover_bins is None else max_leftover_bins)
    self._ratio = packing_ratio

  def __iter__(self) -> _RatioPackIterator:
    return _RatioPackIterator(self._samples, *self._args)

  def __str__(self) -> str:
    return f"RatioPackIterDataset(seq_len={self._args[0]}, packing_ratio={self._ratio})"
