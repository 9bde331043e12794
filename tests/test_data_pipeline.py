"""make_batch_iterator: batch contract, determinism, sharding, epochs, exact resume."""

import json

import numpy as np
import pytest

from _data_support import data_cfg

from lora_jax.data import DataError, encode_cpt_example, load_records, make_batch_iterator
from lora_jax.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
KEYS = {"tokens", "positions", "segment_ids", "loss_mask"}


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x) for x, y in zip(a, b))


def _docs_from_stream(batches):
  """CPT: the documents (as text) in a stream of batches, by concatenating real tokens."""
  toks = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
  ends = np.flatnonzero(toks == TOK.eos_id)
  starts = np.concatenate([[0], ends[:-1] + 1])
  assert ends[-1] == len(toks) - 1
  return [TOK.decode(toks[s + 1:e]) for s, e in zip(starts, ends)]  # drop BOS


@pytest.mark.parametrize("regime", ["cpt", "ift"])
def test_batch_contract(regime):
  it = make_batch_iterator(data_cfg(regime=regime, synthetic_docs=64), TOK, seq_len=256,
                           batch_size=4, seed=0)
  for b in _take(it, 5):
    assert set(b) == KEYS
    assert all(v.shape == (4, 256) and v.dtype == np.int32 for v in b.values())
    seg, pos = b["segment_ids"], b["positions"]
    starts = (seg > 0) & np.concatenate([np.ones((4, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
    assert (pos[starts] == 0).all()
    cont = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    assert (pos[:, 1:][cont] == pos[:, :-1][cont] + 1).all()
    assert (b["loss_mask"][seg == 0] == 0).all() and (b["tokens"][seg == 0] == TOK.pad_id).all()
    if regime == "cpt":
      assert (b["loss_mask"] == (seg > 0)).all()
    else:  # response tokens end with EOS
      assert 0 < b["loss_mask"].sum() < (seg > 0).sum()
  assert it.stats["batches"] == 5 and it.stats["tokens"] == sum(
      int((b["segment_ids"] > 0).sum()) for b in _take(make_batch_iterator(
          data_cfg(regime=regime, synthetic_docs=64), TOK, seq_len=256, batch_size=4, seed=0), 5))


def test_cpt_epoch_holds_every_document_once():
  cfg = data_cfg(synthetic_docs=50, shuffle=False)
  batches = list(make_batch_iterator(cfg, TOK, seq_len=64, batch_size=1, seed=0, num_epochs=1))
  records = load_records(cfg)
  assert _docs_from_stream(batches) == [records[i]["text"] for i in range(50)]
  total = sum(len(encode_cpt_example(records[i], TOK)[0]) for i in range(50))
  assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == total


def test_shuffle_is_deterministic_by_seed_and_reshuffles_each_epoch():
  cfg = data_cfg(synthetic_docs=40)
  run = lambda seed: list(make_batch_iterator(cfg, TOK, seq_len=64, batch_size=1, seed=seed,
                                              num_epochs=2))
  a, b, c = run(1), run(1), run(2)
  assert _same(a, b) and not _same(a, c)
  docs = _docs_from_stream(a)
  assert len(docs) == 80
  epoch0, epoch1 = docs[:40], docs[40:]
  assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
  unshuffled = _docs_from_stream(list(make_batch_iterator(
      data_cfg(synthetic_docs=40, shuffle=False), TOK, seq_len=64, batch_size=1, seed=1,
      num_epochs=1)))
  assert sorted(unshuffled) == sorted(epoch0) and unshuffled != epoch0


def test_process_shards_are_disjoint_and_cover_the_data():
  cfg = data_cfg(synthetic_docs=31)
  shards = []
  for p in range(3):
    it = make_batch_iterator(cfg, TOK, seq_len=64, batch_size=1, seed=5, process_index=p,
                             process_count=3, num_epochs=1)
    shards.append(_docs_from_stream(list(it)))
  records = load_records(cfg)
  everything = sorted(records[i]["text"] for i in range(31))
  assert sorted(sum(shards, [])) == everything
  assert [len(s) for s in shards] == [11, 10, 10]
  ids = [set(s) for s in shards]
  assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])


@pytest.mark.parametrize("regime,pack", [("cpt", True), ("ift", True), ("ift", False)])
def test_state_restore_yields_exact_next_batches(regime, pack):
  cfg = data_cfg(regime=regime, pack=pack, synthetic_docs=30)
  kw = dict(seq_len=96, batch_size=3, seed=7)
  it = make_batch_iterator(cfg, TOK, **kw)
  offsets = []
  for _ in range(12):  # crosses an epoch boundary (30 docs)
    next(it)
    state = json.dumps(it.get_state())  # JSON-serializable
    offsets.append(json.loads(state)["pipeline"]["offset"])
  want = _take(it, 6)
  fresh = make_batch_iterator(cfg, TOK, **kw)
  fresh.set_state(state)
  assert _same(_take(fresh, 6), want)
  assert fresh.stats == it.stats
  if regime == "cpt":
    assert max(offsets) > 0, "some checkpoint fell inside a document"
  again = make_batch_iterator(cfg, TOK, **kw)
  again.set_state(state.encode())
  assert _same(_take(again, 2), want[:2])


def test_state_from_another_pipeline_is_rejected():
  it = make_batch_iterator(data_cfg(), TOK, seq_len=64, batch_size=2, seed=0)
  next(it)
  other = make_batch_iterator(data_cfg(), TOK, seq_len=64, batch_size=4, seed=0)
  with pytest.raises(DataError, match="batch_size: saved 2, now 4"):
    other.set_state(it.get_state())


def test_epochs_and_batches_per_epoch():
  cfg = data_cfg(regime="ift", synthetic_docs=60, pack=False)
  it = make_batch_iterator(cfg, TOK, seq_len=512, batch_size=7, seed=0, num_epochs=2)
  batches = list(it)
  assert len(batches) == 120 // 7 and it.stats["documents"] == 7 * (120 // 7)
  assert it.batches_per_epoch == 60 // 7
  assert it.epoch_stats["documents"] == 60 and it.epoch_stats["rows"] == 60
  sharded = make_batch_iterator(cfg, TOK, seq_len=512, batch_size=7, seed=0, process_index=1,
                                process_count=2)
  assert sharded.batches_per_epoch == 60 // 14  # global batches, the same on every process


def test_ift_truncation_is_counted(caplog):
  cfg = data_cfg(regime="ift", format="magicoder", synthetic_docs=12, pack=False)
  it = make_batch_iterator(cfg, TOK, seq_len=64, batch_size=4, seed=0, num_epochs=1)
  with caplog.at_level("WARNING"):
    list(it)
  assert it.stats["truncated"] == 12 and it.stats["documents"] == 12
  assert sum("truncated to seq_len=64" in r.message for r in caplog.records) == 1


def test_too_little_data_for_one_batch(caplog):
  it = make_batch_iterator(data_cfg(synthetic_docs=2), TOK, seq_len=512, batch_size=8, seed=0)
  with caplog.at_level("WARNING"):
    assert it.batches_per_epoch == 0
  assert "fewer than one global batch (8)" in caplog.text
  assert set(next(it)) == KEYS  # the stream still repeats forever


@pytest.mark.slow  # starting grain worker processes (which import jax) takes seconds
def test_worker_process_matches_serial_stream_and_resumes():
  cfg = data_cfg(synthetic_docs=40, num_workers=1)
  kw = dict(seq_len=64, batch_size=2, seed=3)
  it = make_batch_iterator(cfg, TOK, **kw)
  try:
    _take(it, 4)
    state = json.dumps(it.get_state())
    want = _take(it, 3)
  finally:
    it.close()
  fresh = make_batch_iterator(cfg, TOK, **kw)
  try:
    fresh.set_state(state)
    assert _same(_take(fresh, 3), want)
  finally:
    fresh.close()
  serial = _take(make_batch_iterator(data_cfg(synthetic_docs=40), TOK, **kw), 7)
  assert _same(serial[4:], want)


def test_packing_ratio_steps_samples_and_exact_resume():
  cfg = data_cfg(regime="ift", synthetic_docs=60, packing_ratio=3.0)
  kw = dict(seq_len=512, batch_size=4, seed=5)
  it = make_batch_iterator(cfg, TOK, num_epochs=1, **kw)
  batches = list(it)
  assert it.batches_per_epoch == 60 // 12 == len(batches)  # N // (ratio x batch), drop_last
  assert 4 * len(batches) < it.stats["documents"] <= 60  # each sample at most once
  for b in batches:
    assert set(b) == KEYS and b["tokens"].shape == (4, 512)
    assert (b["loss_mask"][b["segment_ids"] == 0] == 0).all()
  assert max(int(b["segment_ids"].max()) for b in batches) >= 2  # rows hold several samples
  stream = make_batch_iterator(cfg, TOK, **kw)
  _take(stream, 7)  # crosses the epoch boundary
  state = json.dumps(stream.get_state())
  assert json.loads(state)["pipeline"]["step"] == 7
  want = _take(stream, 4)
  fresh = make_batch_iterator(cfg, TOK, **kw)
  fresh.set_state(state)
  assert _same(_take(fresh, 4), want) and fresh.stats == stream.stats


def test_packing_ratio_is_ift_only():
  with pytest.raises(DataError, match="data.packing_ratio"):
    make_batch_iterator(data_cfg(regime="cpt", packing_ratio=2.0), TOK, seq_len=64, batch_size=2,
                        seed=0)


@pytest.mark.slow  # starting grain worker processes (which import jax) takes seconds
def test_packing_ratio_in_a_worker_process_matches_the_serial_stream_and_resumes():
  kw = dict(seq_len=512, batch_size=4, seed=5)
  serial = _take(make_batch_iterator(data_cfg(regime="ift", synthetic_docs=60, packing_ratio=3.0),
                                     TOK, **kw), 6)
  cfg = data_cfg(regime="ift", synthetic_docs=60, packing_ratio=3.0, num_workers=1)
  it = make_batch_iterator(cfg, TOK, **kw)
  try:
    got = _take(it, 3)
    state = json.dumps(it.get_state())
    got += _take(it, 3)
  finally:
    it.close()
  assert _same(got, serial)
  fresh = make_batch_iterator(cfg, TOK, **kw)
  try:
    fresh.set_state(state)
    assert _same(_take(fresh, 3), serial[3:])
  finally:
    fresh.close()
