"""Packing tokenized documents into fixed-length rows with segment ids and per-segment positions.

A row is four int32 [L] arrays: `tokens`, `positions` (0 at each segment start), `segment_ids`
(1..n within the row, 0 = padding) and `loss_mask`. Modes:
  "split"   CPT: documents are concatenated greedily; a document longer than the space left in a
            row continues in the next row as a new segment (its positions restart at 0, and its
            first token there is not predicted, because predictions never cross segments).
  "whole"   IFT packed: whole samples (already truncated to L) are placed greedily in order; a
            sample that does not fit closes the row (padding the rest) and starts the next one.
  "single"  IFT unpacked: one sample per row, padded.
`Packer` is shared by the pure `pack_documents` and the checkpointable `PackIterDataset`.
"""

from __future__ import annotations

import logging
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
