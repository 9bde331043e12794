"""Packing: every token kept in order, segments never mixed, positions restart per segment."""

import numpy as np
import pytest

from lora_jax.data.packing import Packer, pack_documents

L = 16


def _docs(n=40, seed=0, max_len=40):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(3, 259, size=int(rng.integers(1, max_len)))) for _ in range(n)]


def _segments(rows):
  """[(row, segment id, tokens, positions, mask)] in order."""
  out = []
  for r in range(len(rows["tokens"])):
    seg = rows["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      out.append((r, s, rows["tokens"][r][idx], rows["positions"][r][idx],
                  rows["loss_mask"][r][idx], idx))
  return out


def _check_row_structure(rows, pad_id=0):
  for r in range(len(rows["tokens"])):
    seg, pos = rows["segment_ids"][r], rows["positions"][r]
    real = np.flatnonzero(seg > 0)
    assert len(real) and (real == np.arange(len(real))).all(), "padding only at the row end"
    assert (np.diff(seg[real]) >= 0).all() and set(np.diff(seg[real])) <= {0, 1}
    assert seg[real[0]] == 1
    pad = seg == 0
    assert (rows["tokens"][r][pad] == pad_id).all() and (rows["loss_mask"][r][pad] == 0).all()
    assert (pos[pad] == 0).all()
  for _, _, toks, pos, _, idx in _segments(rows):
    assert (pos == np.arange(len(toks))).all(), "positions restart at 0 in each segment"
    assert (np.diff(idx) == 1).all(), "a segment is contiguous"


def test_split_mode_keeps_every_token_in_order_and_fills_rows():
  docs = _docs()
  rows = pack_documents(docs, L)
  _check_row_structure(rows)
  real = rows["segment_ids"] > 0
  assert (rows["tokens"][real] == np.concatenate(docs)).all()
  assert real[:-1].all(), "every row but the last is full"
  assert len(rows["tokens"]) == -(-sum(map(len, docs)) // L)
  assert rows["loss_mask"][real].all()


def test_split_mode_long_document_continues_as_new_segment():
  rows = pack_documents([[5] * 3, list(range(10, 50)), [7] * 2], L)
  # doc 2 (40 tokens) starts after doc 1 in row 0, fills rows 1 and continues in row 2.
  assert rows["segment_ids"][0].tolist() == [1] * 3 + [2] * 13
  assert rows["segment_ids"][1].tolist() == [1] * 16
  assert rows["positions"][1].tolist() == list(range(16)), "continuation restarts positions"
  assert rows["tokens"][1].tolist() == list(range(23, 39))
  assert rows["segment_ids"][2].tolist() == [1] * 11 + [2] * 2 + [0] * 3
  assert rows["tokens"][2][:11].tolist() == list(range(39, 50))


def test_whole_mode_never_splits_and_preserves_order():
  docs = _docs(max_len=L + 1)
  masks = [list(np.arange(len(d)) % 2) for d in docs]
  rows = pack_documents(docs, L, mask_lists=masks, pad_id=0, mode="whole")
  _check_row_structure(rows)
  segs = _segments(rows)
  assert len(segs) == len(docs)
  for (_, _, toks, _, mask, _), doc, m in zip(segs, docs, masks):
    assert toks.tolist() == doc and mask.tolist() == m
  # greedy: a row is closed only when the next document does not fit
  fills = (rows["segment_ids"] > 0).sum(1)
  firsts = [len(docs[i]) for i, s in enumerate(segs) if s[1] == 1][1:]
  assert all(f + n > L for f, n in zip(fills[:-1], firsts))


def test_single_mode_one_document_per_row_padded():
  docs = [[4, 5, 6], [7] * L, [8]]
  rows = pack_documents(docs, L, pad_id=9, mode="single")
  assert rows["tokens"].shape == (3, L)
  assert rows["segment_ids"].max(1).tolist() == [1, 1, 1]
  assert rows["tokens"][0].tolist() == [4, 5, 6] + [9] * (L - 3)
  assert rows["loss_mask"][2].tolist() == [1] + [0] * (L - 1)


def test_whole_mode_rejects_untruncated_document():
  with pytest.raises(ValueError, match="does not fit seq_len=16"):
    pack_documents([[3] * (L + 1)], L, mode="whole")


def test_contract_loss_count_is_tokens_minus_one_per_document():
  """The train-side rule: predict t+1 iff loss_mask[t+1] and segment_ids[t+1] == segment_ids[t] != 0.
  For unsplit CPT documents that is len(doc) - 1 targets each."""
  docs = _docs(n=30, max_len=L)
  rows = pack_documents(docs, L, mode="whole")
  seg, mask = rows["segment_ids"], rows["loss_mask"]
  counted = (mask[:, 1:] == 1) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
  assert counted.sum() == sum(len(d) - 1 for d in docs)


def test_packer_counts_split_document_once_and_skips():
  docs = iter([({"ids": np.arange(3, 40, dtype=np.int32),
                 "mask": np.ones(37, np.int32)}, "s0"), ({"skip": 1}, "s1"),
               ({"ids": np.arange(3, 8, dtype=np.int32), "mask": np.ones(5, np.int32),
                 "truncated": 99}, "s2")])
  packer = Packer(L, 0, "split")
  rows = []
  while (row := packer.next_row(lambda: next(docs, None))) is not None:
    rows.append(row)
    if packer.cur is not None:
      assert packer.cur_token == "s0" and packer.offset == 16 * len(rows)
  assert [int(r["_documents"]) for r in rows] == [1, 0, 1]
  assert sum(int(r["_skipped"]) for r in rows) == 1
  assert sum(int(r["_truncated"]) for r in rows) == 1
  assert sum(int(r["_tokens"]) for r in rows) == 42
