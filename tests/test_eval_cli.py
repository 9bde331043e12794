"""`lora-jax eval` end to end on a tiny random model; run_evals with LoRA unmerged vs merged."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from lora_jax import cli
from lora_jax.config import preset
from lora_jax.data.tokenizers import ByteTokenizer
from lora_jax.evals import results as res
from lora_jax.evals.runner import EvalOptions, expand_tasks, run_evals
from lora_jax.lora import LoraConfig, add_lora, merge_lora
from lora_jax.model import init_params

HERE = os.path.dirname(__file__)
FIX = os.path.join(HERE, "fixtures", "evals")
CFG = preset("tiny")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("evaldata")
  for task in ("gsm8k", "hellaswag", "arc_challenge", "winogrande"):
    shutil.copytree(os.path.join(FIX, task), d / task)
  os.makedirs(d / "humaneval")
  shutil.copy(os.path.join(HERE, "fixtures", "humaneval", "problems.jsonl"),
              d / "humaneval" / "HumanEval.jsonl")
  return str(d)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  from lora_jax.interop.hf import save_hf
  path = str(tmp_path_factory.mktemp("m") / "tiny-hf")
  save_hf(path, CFG, init_params(CFG, jax.random.key(0)))
  return path


def test_eval_cli_end_to_end(hf_model, data_dir, tmp_path, capsys):
  out = str(tmp_path / "eval")
  rc = cli.main(["eval", "--model", hf_model, "--tokenizer", "byte", "--data-dir", data_dir,
                 "--tasks", "humaneval,gsm8k,forgetting", "--limit", "3", "--batch-size", "4",
                 "--humaneval-samples", "2", "--max-new-tokens", "8",
                 "--gsm8k-max-new-tokens", "8", "--num-fewshot", "gsm8k=2,arc_challenge=1",
                 "--out", out, "--quiet", "--step", "7"])
  assert rc == 0, capsys.readouterr().err
  results = res.read_results(out)
  assert results["model"] == hf_model and results["adapter"] is None and results["step"] == 7
  assert set(results["headline"]) == {"humaneval", "gsm8k", "hellaswag", "arc_challenge",
                                      "winogrande", "forgetting"}
  by = {(e["task"], e["metric"]): e for e in results["results"]}
  for key in [("gsm8k", "strict_match"), ("hellaswag", "acc_norm"), ("winogrande", "acc"),
              ("arc_challenge", "acc_per_token"), ("humaneval", "pass@1")]:
    e = by[key]
    assert set(e) >= {"task", "metric", "value", "stderr", "n", "settings"}
    assert 0.0 <= e["value"] <= 1.0
  assert by[("gsm8k", "strict_match")]["n"] == 3 and by[("hellaswag", "acc")]["n"] == 3
  assert by[("arc_challenge", "acc")]["settings"]["num_fewshot"] == 1
  assert by[("winogrande", "acc")]["settings"]["num_fewshot"] == 5
  parts = [results["headline"][t] for t in ("hellaswag", "arc_challenge", "winogrande")]
  assert results["headline"]["forgetting"] == pytest.approx(np.mean(parts))
  rows = [json.loads(line) for line in open(os.path.join(out, "samples_hellaswag.jsonl"))]
  assert len(rows) == 3 and len(rows[0]["logprobs"]) == 4
  rows = [json.loads(line) for line in open(os.path.join(out, "samples_gsm8k.jsonl"))]
  assert len(rows) == 3 and rows[0]["prompt"].count("Question:") == 3
  assert "hellaswag" in capsys.readouterr().out
  # BOS follows the tokenizer (the byte tokenizer adds one) and says so
  assert results["bos"] == {"add_bos": True, "source": "tokenizer", "tokenizer_add_bos": True}
  assert all(e["settings"]["add_bos"] is True for e in results["results"]
             if e["task"] == "hellaswag")


def test_bos_flags_override_the_tokenizer():
  import argparse
  from lora_jax.commands import evaluate
  p = argparse.ArgumentParser()
  evaluate.add_arguments(p)
  base = ["--model", "m", "--out", "o"]
  assert [p.parse_args(base + f).bos for f in ([], ["--bos"], ["--no-bos"])] == [None, True, False]


def test_eval_cli_missing_data_lists_expected_file(hf_model, tmp_path, capsys):
  rc = cli.main(["eval", "--model", hf_model, "--tokenizer", "byte", "--data-dir",
                 str(tmp_path), "--tasks", "gsm8k,winogrande", "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert rc == 2
  assert os.path.join(str(tmp_path), "gsm8k/test.jsonl") in err and "#### <number>" in err
  assert os.path.join(str(tmp_path), "winogrande/validation.jsonl") in err
  assert not os.path.exists(tmp_path / "o" / "results.json")


def test_eval_cli_bad_arguments(hf_model, tmp_path, capsys):
  assert cli.main(["eval", "--model", hf_model, "--tasks", "nope", "--out", str(tmp_path)]) == 2
  assert "unknown task" in capsys.readouterr().err
  assert cli.main(["eval", "--model", hf_model, "--tasks", "gsm8k", "--num-fewshot", "gsm8k:3",
                   "--out", str(tmp_path)]) == 2
  assert "task=k" in capsys.readouterr().err


def test_expand_tasks():
  assert expand_tasks("forgetting,gsm8k") == ["hellaswag", "arc_challenge", "winogrande",
                                              "gsm8k", "forgetting"]
  assert expand_tasks(["winogrande", "forgetting", "winogrande"])[-1] == "forgetting"


def test_run_evals_lora_unmerged_equals_merged(data_dir, tmp_path):
  lora = LoraConfig(rank=2, targets="all")
  params = add_lora(init_params(CFG, jax.random.key(0)), lora, jax.random.key(1))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: 0.3 * np.ones(x.shape, x.dtype) if p[-1].key == "lora_b" else x, params)
  opts = EvalOptions(data_dir=data_dir, limit=2, batch_size=4, progress=False,
                     num_fewshot={"winogrande": 1})
  a = run_evals(CFG, params, lora, ByteTokenizer(), ["winogrande"], opts, log=None,
                out_dir=str(tmp_path / "a"))
  b = run_evals(CFG, merge_lora(params, lora), None, ByteTokenizer(), ["winogrande"], opts,
                log=None, out_dir=str(tmp_path / "b"))
  run_evals(CFG, init_params(CFG, jax.random.key(0)), None, ByteTokenizer(),
            ["winogrande"], opts, log=None, out_dir=str(tmp_path / "c"))
  rows = lambda d: [json.loads(x) for x in open(tmp_path / d / "samples_winogrande.jsonl")]  # noqa
  la, lb, lc = ([r["logprobs"] for r in rows(d)] for d in "abc")
  np.testing.assert_allclose(la, lb, atol=1e-4)
  assert np.abs(np.asarray(la) - np.asarray(lc)).max() > 1e-3
  assert a["headline"]["winogrande"] == b["headline"]["winogrande"]
  # The same adapter through the CLI: HF base dir + PEFT adapter dir, applied unmerged.
  from lora_jax.interop.hf import save_hf
  from lora_jax.interop.peft import save_peft
  base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
  save_hf(base_dir, CFG, init_params(CFG, jax.random.key(0)))
  save_peft(adapter_dir, CFG, lora, params, base_model_name_or_path=base_dir)
  rc = cli.main(["eval", "--model", base_dir, "--adapter", adapter_dir, "--tokenizer", "byte",
                 "--data-dir", data_dir, "--tasks", "winogrande", "--limit", "2",
                 "--num-fewshot", "winogrande=1", "--batch-size", "4", "--quiet",
                 "--out", str(tmp_path / "d")])
  assert rc == 0
  assert res.read_results(str(tmp_path / "d"))["adapter"] == adapter_dir
  np.testing.assert_allclose([r["logprobs"] for r in rows("d")], la, atol=1e-4)


def test_passk_curve_option(hf_model, data_dir, tmp_path, capsys):
  """--passk-curve: pass@k for every k = 1..n at T = 0.8 (the paper's Appendix F); n here is small."""
  import argparse
  from lora_jax.commands import evaluate
  from lora_jax.evals import passk
  p = argparse.ArgumentParser()
  evaluate.add_arguments(p)
  base = ["--model", "m", "--out", "o"]
  assert evaluate._humaneval_sampling(p.parse_args(base)) == {
      "humaneval_samples": 50, "humaneval_temperature": 0.2}
  curve = evaluate._humaneval_sampling(p.parse_args(base + ["--passk-curve"]))
  assert curve["humaneval_samples"] == 256 and curve["humaneval_temperature"] == 0.8
  assert curve["humaneval_ks"] == tuple(range(1, 257))
  out = str(tmp_path / "curve")
  rc = cli.main(["eval", "--model", hf_model, "--tokenizer", "byte", "--data-dir", data_dir,
                 "--tasks", "humaneval", "--limit", "2", "--passk-curve",
                 "--humaneval-samples", "4", "--max-new-tokens", "4", "--quiet", "--out", out])
  assert rc == 0, capsys.readouterr().err
  results = res.read_results(out)
  ks, values = passk.curve(results)
  assert ks == [1, 2, 3, 4] and values == sorted(values)  # pass@k never falls with k
  he = [e for e in results["results"] if e["metric"] == "pass@1"][0]
  assert he["settings"]["temperature"] == 0.8 and he["n"] == 4
