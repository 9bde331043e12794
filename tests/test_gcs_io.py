"""Readers and writers outside training against a real GCS API (gcp-storage-emulator on
127.0.0.1, the `gcs_url` fixture of conftest.py): HF / PEFT / lora-jax exports and loads,
`lora-jax eval|analyze|report` with gs:// inputs and outputs, data files and tokenizers on gs://.

Every test runs in a fresh working directory and checks that nothing created a local `gs:`
directory there (the sign of a gs:// path handled as a local one)."""

import gzip
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from _data_support import data_cfg
from _gcs_support import local_gs_dirs

from lora_jax import cli, fileio
from lora_jax.config import preset
from lora_jax.lora import LoraConfig, add_lora
from lora_jax.model import init_params

HERE = os.path.dirname(__file__)
CFG = preset("tiny")


@pytest.fixture(autouse=True)
def _no_local_gs_dir(tmp_path, monkeypatch):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield
  assert local_gs_dirs(str(cwd)) == []


def _flat(params):
  return traverse_util.flatten_dict(dict(params))


def _assert_bitwise_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


# --------------------------------------------------------------------------- interop
@pytest.mark.parametrize("max_shard_bytes", [None, 40_000])
def test_save_hf_to_gcs_and_load_hf_back_bitwise(params, gcs_url, max_shard_bytes):
  from lora_jax.interop import hf
  url = fileio.join(gcs_url, "hf")
  kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
  assert hf.save_hf(url, CFG, params, **kw) == url
  names = fileio.listdir(url)
  if max_shard_bytes is None:
    assert names == ["config.json", "model.safetensors"]
  else:  # sharded: several shards + the index
    assert hf.INDEX_FILE in names and sum(n.startswith("model-") for n in names) > 1
  config, loaded = hf.load_hf(url)
  assert config.num_hidden_layers == CFG.num_hidden_layers
  _assert_bitwise_equal(params, loaded)
  tensors = hf.open_hf_tensors(url)
  assert tensors.file_of(("norm", "scale")).startswith(url + "/")


def test_save_hf_on_gcs_keeps_foreign_objects_only_with_overwrite(params, gcs_url):
  from lora_jax.interop import hf
  url = fileio.join(gcs_url, "hf")
  fileio.atomic_write_text(fileio.join(url, "README.md"), "keep me")
  with pytest.raises(FileExistsError, match="README.md"):
    hf.save_hf(url, CFG, params)
  assert fileio.listdir(url) == ["README.md"]
  hf.save_hf(url, CFG, params, overwrite=True)
  assert fileio.read_text(fileio.join(url, "README.md")) == "keep me"
  _assert_bitwise_equal(params, hf.load_hf(url)[1])


def test_bad_hf_objects_on_gcs_are_named_by_their_url(params, gcs_url):
  from lora_jax.interop import hf
  url = fileio.join(gcs_url, "hf")
  with pytest.raises(FileNotFoundError, match=f"{url}: HF checkpoint directory not found"):
    hf.load_hf(url)
  hf.save_hf(url, CFG, params)
  fileio.atomic_write_bytes(fileio.join(url, hf.SINGLE_FILE), b"\x10\x00garbage")
  with pytest.raises(ValueError) as e:
    hf.load_hf(url)
  assert f"{url}/{hf.SINGLE_FILE}: not a readable safetensors file" in str(e.value)
  assert "lora_jax-download" not in str(e.value)  # not the staged temp copy


def test_save_peft_load_peft_and_load_model_on_gcs(params, gcs_url):
  from lora_jax.interop import hf, native, peft
  lora_cfg = LoraConfig(rank=4, targets=("q_proj", "v_proj"))
  tuned = add_lora(params, lora_cfg, jax.random.key(1))
  tuned = jax.tree.map(lambda x: x + 0.01, tuned)  # lora_b is zero at init
  base_url, adapter_url = fileio.join(gcs_url, "base"), fileio.join(gcs_url, "adapter")
  hf.save_hf(base_url, CFG, params)
  assert peft.save_peft(adapter_url, CFG, lora_cfg, tuned, base_model_name_or_path=base_url) \
      == adapter_url
  assert fileio.listdir(adapter_url) == [peft.ADAPTER_CONFIG, peft.ADAPTER_WEIGHTS]
  lora, loaded = peft.load_peft(adapter_url, CFG, params)
  assert lora.rank == 4 and set(lora.target_modules) == {"q_proj", "v_proj"}
  want = {k: v for k, v in _flat(tuned).items() if k[-1] in ("lora_a", "lora_b")}
  got = {k: v for k, v in _flat(loaded).items() if k[-1] in ("lora_a", "lora_b")}
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(np.asarray(want[k]), got[k])
  # the adapter's base_model_name_or_path is a gs:// dir: load_model follows it
  _, via_base, lora2 = native.load_model(adapter_url)
  assert lora2.rank == 4
  _assert_bitwise_equal(loaded, via_base)
  # analysis reads the same factors from the bucket (A [in, R], B [R, out])
  from lora_jax.analysis.sources import open_source
  a, b, _ = open_source(adapter_url, base=open_source(base_url)).lora(1, "v_proj")
  np.testing.assert_allclose(a, np.asarray(want[("layers_1", "self_attn", "v_proj", "lora_a")]))
  np.testing.assert_allclose(b, np.asarray(want[("layers_1", "self_attn", "v_proj", "lora_b")]))


def test_save_checkpoint_and_load_checkpoint_on_gcs(params, gcs_url):
  from lora_jax.interop import native
  url = fileio.join(gcs_url, "ckpt")
  assert native.save_checkpoint(url, CFG, params, metadata={"step": 3}) == url
  assert fileio.isfile(fileio.join(url, native.META_FILE))
  assert native.detect_format(url) == "lora-jax"
  config, loaded, lora = native.load_checkpoint(url)
  assert lora is None and config.num_hidden_layers == CFG.num_hidden_layers
  _assert_bitwise_equal(params, loaded)


def test_convert_and_export_peft_clis_from_and_to_gcs(params, gcs_url, capsys):
  from lora_jax.interop import hf, native, peft
  lora_cfg = LoraConfig(rank=4, targets=("q_proj",))
  tuned = jax.tree.map(lambda x: x + 0.01, add_lora(params, lora_cfg, jax.random.key(2)))
  ckpt = fileio.join(gcs_url, "ckpt")
  native.save_checkpoint(ckpt, CFG, tuned, lora_cfg, metadata={"base_model_name_or_path": "b"})
  adapter, merged, again = (fileio.join(gcs_url, n) for n in ("adapter", "merged", "again"))
  assert cli.main(["export-peft", ckpt, adapter, "--merged-hf", merged]) == 0, \
      capsys.readouterr().err
  out = capsys.readouterr().out
  assert f"wrote PEFT adapter {adapter} " in out and f"wrote merged HF model {merged}" in out
  assert peft.load_peft(adapter, CFG, params)[0].rank == 4
  assert cli.main(["convert", merged, again]) == 0, capsys.readouterr().err  # HF -> lora-jax
  assert native.read_checkpoint_info(again)["metadata"]["source"] == merged
  _assert_bitwise_equal(hf.load_hf(merged)[1], native.load_checkpoint(again)[1])


# --------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def gcs_models(gcs_emulator):
  """A tiny HF base and a finetuned HF model (different weights) in the bucket."""
  from lora_jax.interop import hf
  root = gcs_emulator.url()
  base, ft = fileio.join(root, "base"), fileio.join(root, "ft")
  p0 = init_params(CFG, jax.random.key(0))
  hf.save_hf(base, CFG, p0)
  rng = np.random.default_rng(0)
  hf.save_hf(ft, CFG, jax.tree.map(
      lambda x: (np.asarray(x) + 0.02 * rng.standard_normal(x.shape)).astype(x.dtype), p0))
  return base, ft


def test_eval_cli_reads_model_and_data_from_gcs_and_writes_results_there(gcs_models, gcs_url,
                                                                         tmp_path, capsys):
  from lora_jax.evals import results as res
  data = fileio.join(gcs_url, "data")
  fileio.upload_tree(os.path.join(HERE, "fixtures", "evals", "hellaswag"),
                     fileio.join(data, "hellaswag"))
  out = fileio.join(gcs_url, "eval")
  rc = cli.main(["eval", "--model", gcs_models[0], "--tokenizer", "byte", "--data-dir", data,
                 "--tasks", "hellaswag", "--limit", "3", "--batch-size", "4", "--out", out,
                 "--quiet"])
  assert rc == 0, capsys.readouterr().err
  assert fileio.listdir(out) == ["results.json", "samples_hellaswag.jsonl"]
  results = res.read_results(out)
  assert results["model"] == gcs_models[0]
  assert {(e["task"], e["n"]) for e in results["results"]} == {("hellaswag", 3)}
  rows = fileio.read_text(fileio.join(out, "samples_hellaswag.jsonl")).splitlines()
  assert len(rows) == 3 and len(json.loads(rows[0])["logprobs"]) == 4
  assert f"wrote {out}/results.json" in capsys.readouterr().out


def test_analyze_cli_reads_and_writes_gcs(gcs_models, gcs_url, capsys):
  from lora_jax import analysis
  out = fileio.join(gcs_url, "analysis")
  rc = cli.main(["analyze", "--base", gcs_models[0], "--finetuned", gcs_models[1], "--out", out,
                 "--modules", "q_proj,down_proj", "--random-n", "64", "--quiet"])
  assert rc == 0, capsys.readouterr().err
  names = fileio.listdir(out)
  assert {"spectra.npz", "analysis.json", "rank_by_layer.png", "spectra.png"} <= set(names)
  assert fileio.read_bytes(fileio.join(out, "spectra.png"))[:8] == b"\x89PNG\r\n\x1a\n"
  loaded = analysis.load_analysis(out)
  assert {r["module"] for r in loaded.rows} == {"q_proj", "down_proj"}
  assert len(loaded.rows) == 2 * CFG.num_hidden_layers and loaded.spectra
  assert f"wrote analysis: {out}/analysis.json" in capsys.readouterr().out


@pytest.mark.slow  # two full reports (~15 s of matplotlib)
def test_report_cli_reads_runs_from_gcs_and_writes_report_there(gcs_url, tmp_path, capsys):
  from lora_jax import analysis
  fixtures = os.path.join(HERE, "fixtures", "report")
  rng = np.random.default_rng(0)
  base = {"layers_0": {"self_attn": {"q_proj": {"kernel": rng.standard_normal((16, 16))}}}}
  ft = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape), base)
  res = analysis.analyze(base, ft, modules="q_proj", progress=False)
  runs, local_runs = [], []
  for name in ("full", "lora_r16"):
    local_runs.append(str(tmp_path / "runs" / name))
    shutil.copytree(os.path.join(fixtures, name), local_runs[-1])
    if name == "full":  # the spectral sections read analysis/ from the run dir
      analysis.save_analysis(res, os.path.join(local_runs[-1], "analysis"))
    runs.append(fileio.join(gcs_url, "runs", name))
    fileio.upload_tree(local_runs[-1], runs[-1])
  out, local = fileio.join(gcs_url, "report"), str(tmp_path / "report")
  assert cli.main(["report", "--runs", *runs, "--out", out, "--no-paper"]) == 0, \
      capsys.readouterr().err
  assert cli.main(["report", "--runs", *local_runs, "--out", local, "--no-paper"]) == 0
  assert fileio.listdir(out) == sorted(os.listdir(local))
  remote_figures = fileio.listdir(fileio.join(out, "figures"))
  assert remote_figures == sorted(os.listdir(os.path.join(local, "figures")))
  assert {"loss.png", "rank_by_layer.png", "spectra.png"} <= set(remote_figures)
  text = fileio.read_text(fileio.join(out, "report.md"))
  assert f"`{runs[0]}`" in text  # the run table names the bucket paths
  local_text = open(os.path.join(local, "report.md")).read()
  for rel in ("`" + local_runs[0] + "`", "`" + local_runs[1] + "`"):
    local_text = local_text.replace(rel, "")
  for rel in ("`" + runs[0] + "`", "`" + runs[1] + "`"):
    text = text.replace(rel, "")
  assert text == local_text  # same numbers, same figures; only the paths differ


def test_report_on_gcs_refuses_foreign_objects_without_overwrite(gcs_url, capsys):
  run = fileio.join(gcs_url, "run")
  fileio.upload_tree(os.path.join(HERE, "fixtures", "report", "full"), run)
  out = fileio.join(gcs_url, "out")
  fileio.atomic_write_text(fileio.join(out, "notes.txt"), "mine")
  assert cli.main(["report", "--runs", run, "--out", out, "--no-paper"]) == 2
  assert "notes.txt" in capsys.readouterr().err and fileio.listdir(out) == ["notes.txt"]


# --------------------------------------------------------------------------- data
def _write(kind, rows, path):
  if kind == "jsonl":
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  elif kind == "jsonl.gz":
    with gzip.open(path, "wt") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  elif kind == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
  else:
    from array_record.python import array_record_module as arm
    w = arm.ArrayRecordWriter(str(path), "group_size:1")
    for r in rows:
      w.write(json.dumps(r).encode())
    w.close()


@pytest.mark.parametrize("kind,ext", [("jsonl", ".jsonl"), ("jsonl.gz", ".jsonl.gz"),
                                      ("parquet", ".parquet"), ("arrayrecord", ".array_record")])
def test_data_on_gcs_gives_the_same_records_and_batches_as_local(kind, ext, gcs_url, tmp_path):
  from lora_jax.data import load_records, make_batch_iterator
  from lora_jax.data.tokenizers import ByteTokenizer
  rows = [json.loads(line) for line in open(os.path.join(HERE, "fixtures", "data", "cpt.jsonl"))
          if line.strip()]
  local = tmp_path / "shards"
  local.mkdir()
  _write(kind, rows[:5], local / f"a{ext}")
  _write(kind, rows[5:], local / f"b{ext}")
  remote = fileio.join(gcs_url, "shards")
  fileio.upload_tree(str(local), remote)
  source = "jsonl" if kind.startswith("jsonl") else kind
  for spec in (remote, fileio.join(remote, f"*{ext}"),
               f"{fileio.join(remote, 'a' + ext)},{fileio.join(remote, 'b' + ext)}"):
    ds = load_records(data_cfg(source=source, path=spec))
    assert [ds[i]["text"] for i in range(len(ds))] == [r["text"] for r in rows]
  assert ds[5]["_where"].startswith(fileio.join(remote, f"b{ext}") + ":")  # names the object
  tok = ByteTokenizer()

  def batches(path):
    it = make_batch_iterator(data_cfg(source=source, path=path), tok, seq_len=64, batch_size=2,
                             seed=0, num_epochs=1)
    return [{k: np.asarray(v) for k, v in b.items()} for b in it]
  want, got = batches(str(local)), batches(remote)
  assert len(want) == len(got) > 0
  for a, b in zip(want, got):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  from lora_jax.data import sources
  staged = sources.stage([fileio.join(remote, f"a{ext}")])[0]
  assert not fileio.is_remote(staged)
  assert fileio.read_bytes(staged) == (local / f"a{ext}").read_bytes()
  assert sources.stage([fileio.join(remote, f"a{ext}")]) == [staged]  # downloaded once


def test_missing_data_on_gcs_names_the_url(gcs_url):
  from lora_jax.data import DataError, load_records
  missing = fileio.join(gcs_url, "nope.jsonl")
  with pytest.raises(DataError, match=f"{missing}: no such file"):
    load_records(data_cfg(source="jsonl", path=missing))
  with pytest.raises(DataError, match="matches no files"):
    load_records(data_cfg(source="jsonl", path=fileio.join(gcs_url, "*.jsonl")))


def test_tokenizer_from_a_gcs_directory(gcs_url, tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  from lora_jax.data.tokenizers import load_tokenizer
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"<s>": 0, "</s>": 1, "<pad>": 2, "hello": 3, "world": 4, "[UNK]": 5}, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  local = tmp_path / "tok"
  local.mkdir()
  tok.save(str(local / "tokenizer.json"))
  (local / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>",
                                                           "add_bos_token": False}))
  remote = fileio.join(gcs_url, "tok")
  fileio.upload_tree(str(local), remote)
  loaded = load_tokenizer(remote)
  assert loaded.encode("hello world") == [3, 4]
  assert loaded.eos_id == 1 and loaded.add_bos is False  # tokenizer_config.json read from gs://
  assert loaded.name == fileio.join(remote, "tokenizer.json")
  shutil.rmtree(local)  # nothing depends on the staged copy afterwards
  assert loaded.decode([3, 4]) == "hello world"
