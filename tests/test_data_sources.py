"""Sources: every format round-trips through jsonl, jsonl.gz, Parquet, ArrayRecord and TFDS;
bad input names its file and line (or config key); skip_malformed counts."""

import gzip
import json
import pathlib
import shutil

import numpy as np
import pytest

from _data_support import data_cfg

from lora_jax.data import DataError, encode_ift_example, load_records, make_batch_iterator
from lora_jax.data.tokenizers import ByteTokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"
TOK = ByteTokenizer()
FIELDS = {"magicoder": ("instruction", "response"), "metamath": ("query", "response"),
          "chat": ("messages",), "cpt": ("text",)}


def _rows(name):
  return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


def _write(kind: str, rows, path: pathlib.Path) -> str:
  """rows -> a file of `kind` at path (suffix added); returns the path."""
  if kind == "jsonl":
    out = path.with_suffix(".jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
  elif kind == "jsonl.gz":
    out = path.with_suffix(".jsonl.gz")
    with gzip.open(out, "wt") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  elif kind == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq
    out = path.with_suffix(".parquet")
    pq.write_table(pa.Table.from_pylist(rows), out)
  elif kind == "arrayrecord":
    from array_record.python import array_record_module as arm
    out = path.with_suffix(".array_record")
    w = arm.ArrayRecordWriter(str(out), "group_size:1")
    for r in rows:
      w.write(r if isinstance(r, bytes) else json.dumps(r).encode())
    w.close()
  else:
    raise ValueError(kind)
  return str(out)


def _source_of(kind):
  return "jsonl" if kind.startswith("jsonl") else kind


def _strip(record, fmt):
  return {k: record[k] for k in FIELDS[fmt]}


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "parquet", "arrayrecord"])
@pytest.mark.parametrize("fmt", ["magicoder", "metamath", "chat", "cpt"])
def test_round_trip(kind, fmt, tmp_path):
  rows = _rows(f"{fmt}.jsonl")
  path = _write(kind, rows, tmp_path / fmt)
  ds = load_records(data_cfg(source=_source_of(kind), path=path))
  assert len(ds) == len(rows)
  got = [ds[i] for i in range(len(ds))]
  assert [_strip(r, fmt) for r in got] == [_strip(r, fmt) for r in rows]
  unit = {"parquet": "row 3", "arrayrecord": "record 3"}.get(kind, "3")
  assert got[2]["_where"] == f"{path}:{unit}"
  if fmt != "cpt":  # the encoded response survives the trip
    ids, mask = encode_ift_example(got[0], TOK, "auto")
    answer = rows[0]["response"] if fmt != "chat" else rows[0]["messages"][-1]["content"]
    assert TOK.decode(ids[mask == 1][:-1]).endswith(answer)


def test_glob_list_and_directory(tmp_path):
  a = _write("jsonl", _rows("cpt.jsonl")[:4], tmp_path / "a")
  b = _write("jsonl.gz", _rows("cpt.jsonl")[4:], tmp_path / "b")
  n = len(_rows("cpt.jsonl"))
  for spec in (f"{a},{b}", str(tmp_path / "*.jsonl*"), str(tmp_path)):
    ds = load_records(data_cfg(source="jsonl", path=spec))
    assert [ds[i]["text"] for i in range(len(ds))] == [r["text"] for r in _rows("cpt.jsonl")]
  assert len(ds) == n and ds[4]["_where"] == f"{b}:1"


def test_blank_lines_keep_line_numbers(tmp_path):
  p = tmp_path / "x.jsonl"
  p.write_text('\n{"text": "a"}\n  \n\n{"text": "b"}\r\n')
  ds = load_records(data_cfg(source="jsonl", path=str(p)))
  assert [(ds[i]["text"], ds[i]["_where"]) for i in range(2)] == [("a", f"{p}:2"), ("b", f"{p}:5")]


# ---- TFDS: a tiny dataset built locally (array_record files, no TensorFlow) ----

def _tfds_builder(data_dir):
  import tensorflow_datasets as tfds

  class LoraJaxTinyIft(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "query": tfds.features.Text(), "response": tfds.features.Text(),
          "messages": tfds.features.Sequence({"role": tfds.features.Text(),
                                              "content": tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      chats = _rows("chat.jsonl")
      for i, row in enumerate(_rows("metamath.jsonl")):
        yield i, {"query": row["query"], "response": row["response"],
                  "messages": chats[i]["messages"]}

  return LoraJaxTinyIft(data_dir=str(data_dir), file_format="array_record")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  _tfds_builder(d).download_and_prepare()
  return d


def test_tfds_round_trip(tfds_dir):
  ds = load_records(data_cfg(source="tfds", path="lora_jax_tiny_ift", data_dir=str(tfds_dir)))
  got = [ds[i] for i in range(len(ds))]
  assert got[0]["_where"] == "tfds:lora_jax_tiny_ift[train]:example 1"
  want = sorted(_rows("metamath.jsonl"), key=lambda r: r["query"])
  got_mm = sorted(({"query": r["query"], "response": r["response"]} for r in got),
                  key=lambda r: r["query"])
  assert got_mm == [_strip(r, "metamath") for r in want]  # TFDS reorders examples by key hash
  chats = {json.dumps(r["messages"]) for r in _rows("chat.jsonl")}
  for r in got:  # columnar Sequence features become chat messages again
    ids, mask = encode_ift_example({"messages": r["messages"]}, TOK, "chat")
    assert mask.sum() > 0
    msgs = [{"role": a, "content": b} for a, b in zip(r["messages"]["role"],
                                                      r["messages"]["content"])]
    assert json.dumps(msgs) in chats
  it = make_batch_iterator(data_cfg(source="tfds", path="lora_jax_tiny_ift", data_dir=str(tfds_dir),
                                regime="ift", format="metamath", pack=False),
                           TOK, seq_len=512, batch_size=5, seed=0, num_epochs=1)
  batch = next(it)
  assert it.stats["documents"] == 5 and batch["loss_mask"].sum(1).min() > 0


def test_tfds_wrong_name_and_split(tfds_dir):
  with pytest.raises(DataError, match=r"^data.path: TFDS dataset 'no_such_dataset_xyz' not found"):
    load_records(data_cfg(source="tfds", path="no_such_dataset_xyz", data_dir=str(tfds_dir)))
  with pytest.raises(DataError, match=r"^data.split: .*'validation'"):
    load_records(data_cfg(source="tfds", path="lora_jax_tiny_ift", split="validation",
                      data_dir=str(tfds_dir)))
  with pytest.raises(DataError, match=r"^data.path: empty"):
    load_records(data_cfg(source="tfds", path=""))


# ---- bad input: errors name file and line ----

def _first_error(path, **kw):
  it = make_batch_iterator(data_cfg(**{"source": "jsonl", "path": str(path), **kw}), TOK, seq_len=64,
                           batch_size=1, seed=0, num_epochs=1)
  with pytest.raises(DataError) as e:
    list(it)
  return str(e.value)


@pytest.mark.parametrize("name,line,match", [
    ("bad_json.jsonl", 3, "invalid JSON"),
    ("missing_field.jsonl", 3, "missing data.text_field 'text'"),
    ("wrong_type.jsonl", 3, "must be a string, got list"),
    ("empty_text.jsonl", 2, "empty text"),
    ("not_object.jsonl", 2, "expected a JSON object, got list"),
])
def test_bad_cpt_lines_name_file_and_line(name, line, match):
  msg = _first_error(FIXTURES / name, shuffle=False)
  assert msg.startswith(f"{FIXTURES / name}:{line}: ") and match in msg


def test_bad_ift_lines_name_file_and_line():
  path = FIXTURES / "bad_ift.jsonl"
  msg = _first_error(path, shuffle=False, regime="ift")
  assert msg.startswith(f"{path}:2: cannot detect the IFT format")
  msg = _first_error(path, shuffle=False, regime="ift", format="magicoder")
  assert msg.startswith(f"{path}:2: missing field 'response'")


def test_empty_and_garbage_files(tmp_path):
  with pytest.raises(DataError, match=f"^{FIXTURES / 'empty.jsonl'}: empty file"):
    load_records(data_cfg(source="jsonl", path=str(FIXTURES / "empty.jsonl")))
  junk = bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))
  garbage = tmp_path / "garbage.jsonl"
  garbage.write_bytes(b"\xff\xfe" + junk)
  assert _first_error(garbage).startswith(f"{garbage}:1: not valid UTF-8 text")
  for suffix, source, match in [(".jsonl.gz", "jsonl", "not a valid gzip file"),
                                (".parquet", "parquet", "not a readable Parquet file"),
                                (".array_record", "arrayrecord", "not a readable ArrayRecord")]:
    p = tmp_path / f"junk{suffix}"
    p.write_bytes(junk)
    with pytest.raises(DataError, match=f"^{p}: {match}"):
      load_records(data_cfg(source=source, path=str(p)))


def test_bad_records_in_binary_formats_name_row_and_record(tmp_path):
  ar = _write("arrayrecord", [{"text": "ok"}, b"\x00\x01 not json", {"text": "ok"}], tmp_path / "r")
  assert _first_error(ar, source="arrayrecord", shuffle=False).startswith(
      f"{ar}:record 2: invalid JSON")
  pq_path = _write("parquet", [{"text": "a"}, {"text": "b"}, {"text": None}], tmp_path / "t")
  assert _first_error(pq_path, source="parquet", shuffle=False).startswith(
      f"{pq_path}:row 3: data.text_field 'text' must be a string, got null")


def test_config_errors_name_the_key(tmp_path):
  with pytest.raises(DataError, match=r"^data.source: unknown source 'csv'"):
    load_records(data_cfg(source="csv", path="x"))
  with pytest.raises(DataError, match=r"^data.path: .*nope.jsonl: no such file"):
    load_records(data_cfg(source="jsonl", path=str(tmp_path / "nope.jsonl")))
  with pytest.raises(DataError, match=r"^data.path: glob .* matches no files"):
    load_records(data_cfg(source="jsonl", path=str(tmp_path / "*.jsonl")))
  with pytest.raises(DataError, match=r"^data.path: empty"):
    load_records(data_cfg(source="parquet", path=""))
  with pytest.raises(DataError, match=r"^data.regime"):
    make_batch_iterator(data_cfg(regime="sft"), TOK, seq_len=8, batch_size=1, seed=0)
  with pytest.raises(DataError, match=r"^data.format"):
    make_batch_iterator(data_cfg(regime="ift", format="alpaca"), TOK, seq_len=8, batch_size=1, seed=0)


def test_skip_malformed_counts(tmp_path):
  names = ["bad_json.jsonl", "missing_field.jsonl", "wrong_type.jsonl", "empty_text.jsonl",
           "not_object.jsonl", "empty.jsonl"]
  for n in names:
    shutil.copy(FIXTURES / n, tmp_path / n)
  _write("jsonl", [{"text": "the last good one"}], tmp_path / "zz_good")
  garbage = tmp_path / "garbage.jsonl"
  garbage.write_bytes(b"\xff\xfe\x80 binary\n")
  # 11 good lines; bad: 1 json, 1 missing, 2 wrong type, 1 empty text, 1 not object, 1 binary;
  # empty.jsonl is skipped as a file (logged, not a record).
  cfg = data_cfg(source="jsonl", path=str(tmp_path / "*.jsonl"), skip_malformed=True, shuffle=False)
  it = make_batch_iterator(cfg, TOK, seq_len=64, batch_size=1, seed=0, num_epochs=1)
  batches = list(it)
  assert it.stats["documents"] == 11 and it.stats["skipped"] == 7
  assert it.batches_per_epoch == len(batches)
  assert it.epoch_stats["documents"] == 11 and it.epoch_stats["skipped"] == 7
  text = TOK.decode(np.concatenate([b["tokens"][0] for b in batches]))
  assert "the last good one" in text and "also fine" in text and "broken" not in text


def test_skip_malformed_ift(tmp_path):
  cfg = data_cfg(source="jsonl", path=str(FIXTURES / "bad_ift.jsonl"), regime="ift",
             skip_malformed=True, shuffle=False, pack=False)
  it = make_batch_iterator(cfg, TOK, seq_len=512, batch_size=1, seed=0, num_epochs=1)
  assert len(list(it)) == 2 and it.stats["skipped"] == 3 and it.stats["documents"] == 2
