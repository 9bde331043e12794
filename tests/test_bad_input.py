"""Bad input through the commands a user runs: every case ends in one `lora-jax <cmd>: ...` line on
stderr that names the file:line or the config key, a non-zero exit code (2: bad input, 1: the run
cannot proceed) and no traceback. The libraries' own error tests (test_data_*.py,
test_run_config.py, test_checkpoint_errors.py, test_humaneval.py, test_gsm8k.py, ...) cover the
messages in more variants; these check that they reach the user intact.
"""

import json
import os
import shutil
import subprocess

import pytest

import _fault_support as fs
from lora_jax import cli

FIXTURES = os.path.join(fs.ROOT, "tests", "fixtures")
DATA = os.path.join(FIXTURES, "data")
# A short run: fails fast where the error is found before training, 2 steps where it is not.
SHORT = ("--config.train.steps=2", "--config.train.export=none", "--config.train.tensorboard=false",
         "--config.data.shuffle=false")


def _train(tmp_path, capsys, *args, config=fs.TINY_LORA):
  rc = cli.main(["train", "--config", str(config), f"--config.output_dir={tmp_path / 'run'}",
                 *SHORT, *args])
  err = capsys.readouterr().err
  lines = [ln for ln in err.splitlines() if ln.startswith("lora-jax train:")]
  assert len(lines) == 1, err
  assert "Traceback" not in err, err
  return rc, lines[0]


# --------------------------------------------------------------------------- configs
def _config_file(tmp_path, body: str):
  path = tmp_path / "cfg.py"
  path.write_text("from lora_jax.config import default_config\n"
                  "def get_config():\n  c = default_config()\n  c.train.steps = 2\n"
                  f"{body}  return c\n")
  return path


@pytest.mark.parametrize("args, key, words", [
    (["--config.train.stepz=3"], "train.stepz", "unknown config key"),
    (["--config.lora.rnak=8"], "lora.rnak", "unknown config key"),
    (["--config.train.steps=many"], "train.steps", "expected an int, got 'many'"),
    (["--config.optimizer.lr=fast"], "optimizer.lr", "expected a float"),
    (["--config.lora.enabled=perhaps"], "lora.enabled", "expected a bool"),
    (["--config.lora.rank=0"], "lora.rank", "must be >= 1, got 0"),
    (["--config.lora.rank=-4"], "lora.rank", "must be >= 1, got -4"),
    (["--config.lora.targets=qkv_proj"], "lora.targets", "qkv_proj"),
    (["--config.lora.targets=q_proj,not_a_module"], "lora.targets", "not_a_module"),
    (["--config.mesh.data=2"], "mesh", "does not match the 1 devices"),
    (["--config.mesh.fsdp=0"], "mesh.fsdp", "must be >= 1 or -1"),
    (["--config.train.global_batch=8", "--config.train.microbatches=3"], "train.microbatches",
     "not divisible"),
])
def test_bad_config_override_names_the_key(tmp_path, capsys, args, key, words):
  rc, line = _train(tmp_path, capsys, *args)
  assert rc == 2 and line.startswith(f"lora-jax train: config error: {key}"), line
  assert words in line, line
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("body, key, words", [
    ("  c.train.stepz = 3\n", "train.stepz", "unknown config key"),
    ("  c.lora.rank = 0\n", "lora.rank", "must be >= 1"),
    ("  c.lora.targets = 'qkv_proj'\n", "lora.targets", "qkv_proj"),
    ("  del c.train.seq_len\n", "train.seq_len", "missing from the config"),
])
def test_bad_config_file_names_the_key(tmp_path, capsys, body, key, words):
  rc, line = _train(tmp_path, capsys, config=_config_file(tmp_path, body))
  assert rc == 2 and line.startswith(f"lora-jax train: config error: {key}"), line
  assert words in line, line


@pytest.mark.parametrize("body, words", [
    ("  c.lora.rank = [8]\n", "'rank'"),  # ml_collections refuses the type inside get_config()
    ("  c.optimizer.lr = 'fast'\n", "'lr'"),
    ("  c.train.steps = undefined_name\n", "undefined_name"),
])
def test_config_file_that_raises_names_file_and_line(tmp_path, capsys, body, words):
  path = _config_file(tmp_path, body)
  rc, line = _train(tmp_path, capsys, config=path)
  assert rc == 2 and line.startswith("lora-jax train: config error: config: "), line
  assert f"{path}:5" in line and words in line, line


def test_config_file_that_does_not_load(tmp_path, capsys):
  rc, line = _train(tmp_path, capsys, config=tmp_path / "missing.py")
  assert rc == 2 and "no config file at" in line and "missing.py" in line
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  rc, line = _train(tmp_path, capsys, config=broken)
  assert rc == 2 and f"{broken}:1" in line and "SyntaxError" in line, line


@pytest.mark.parametrize("where", ["module", "get_config"])
def test_config_file_that_calls_sys_exit(tmp_path, capsys, where):
  path = tmp_path / "exits.py"
  path.write_text("import sys\nsys.exit(3)\n" if where == "module" else
                  "import sys\ndef get_config():\n  sys.exit(0)\n")
  rc, line = _train(tmp_path, capsys, config=path)
  assert rc == 2 and "sys.exit" in line and f"{path}:" in line, line


@pytest.mark.slow
def test_batch_not_divisible_by_the_data_axis(tmp_path):
  """4 fake CPU devices: global_batch 6 cannot be split over mesh.data=4 (nor 2x2 data x fsdp)."""
  for extra in (["--config.train.global_batch=6"],
                ["--config.train.global_batch=6", "--config.mesh.data=2", "--config.mesh.fsdp=2"],
                ["--config.mesh.data=3"]):
    proc = subprocess.run(
        fs.train_cmd(tmp_path / "run", *SHORT, *extra), cwd=fs.ROOT, capture_output=True,
        text=True, timeout=120,
        env=fs.env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in err, fs.tail(proc)
    if "--config.mesh.data=3" in extra:
      assert "lora-jax train: config error: mesh" in err and "4 devices" in err, err
    else:
      assert "lora-jax train: config error: train.global_batch: 6 is not divisible by " \
             "data-parallel size (mesh.data*mesh.fsdp = 4)" in err, err


# --------------------------------------------------------------------------- data
def _jsonl(*args):
  return ("--config.data.source=jsonl", *args)


@pytest.mark.parametrize("name, line, words", [
    ("bad_json.jsonl", 3, "invalid JSON"),
    ("missing_field.jsonl", 3, "missing data.text_field 'text'"),
    ("wrong_type.jsonl", 3, "must be a string, got list"),
])
def test_bad_data_line_names_file_and_line(tmp_path, capsys, name, line, words):
  path = os.path.join(DATA, name)
  rc, msg = _train(tmp_path, capsys, *_jsonl(f"--config.data.path={path}"))
  assert rc == 2 and msg.startswith(f"lora-jax train: data error: {path}:{line}: "), msg
  assert words in msg, msg


def test_binary_garbage_names_file_and_line(tmp_path, capsys):
  path = tmp_path / "garbage.jsonl"
  path.write_bytes(b'{"text": "fine"}\n' + bytes(range(128, 256)) * 3 + b"\n")
  rc, msg = _train(tmp_path, capsys, *_jsonl(f"--config.data.path={path}"))
  assert rc == 2 and msg.startswith(f"lora-jax train: data error: {path}:2: not valid UTF-8"), msg


def test_lone_surrogate_in_training_data_names_file_and_line(tmp_path, capsys):
  path = tmp_path / "surrogate.jsonl"
  path.write_text('{"text": "fine \\ud83d\\ude00"}\n{"text": "bad \\ud800 here"}\n')
  rc, msg = _train(tmp_path, capsys, *_jsonl(f"--config.data.path={path}"))
  assert rc == 2 and msg.startswith(f"lora-jax train: data error: {path}:2: "), msg
  assert "lone surrogate" in msg and "\\ud800" in msg, msg


def test_lone_surrogate_in_eval_data_names_file_and_line(tmp_path):
  from lora_jax.data.errors import DataError
  from lora_jax.evals.task_data import read_rows
  path = tmp_path / "rows.jsonl"
  path.write_text('{"question": "ok"}\n{"question": "\\udfff"}\n')
  with pytest.raises(DataError, match=f"{path}:2: .*lone surrogate"):
    read_rows(str(path))


@pytest.mark.parametrize("make, words", [
    (lambda d: os.path.join(DATA, "empty.jsonl"), "empty file"),
    (lambda d: str(d / "nope.jsonl"), "no such file"),
    (lambda d: str(d / "*.jsonl"), "matches no files"),
])
def test_missing_or_empty_data_file(tmp_path, capsys, make, words):
  path = make(tmp_path)
  rc, msg = _train(tmp_path, capsys, *_jsonl(f"--config.data.path={path}"))
  assert rc == 2 and msg.startswith("lora-jax train: data error: ") and words in msg, msg
  assert path in msg or os.path.basename(path) in msg, msg
  assert not (tmp_path / "run" / "checkpoints").exists()  # found before anything was built


def test_wrong_tfds_name(tmp_path, capsys):
  rc, msg = _train(tmp_path, capsys, "--config.data.source=tfds",
                   "--config.data.path=no_such_dataset_xyz", f"--config.data.data_dir={tmp_path}")
  assert rc == 2 and msg.startswith("lora-jax train: data error: data.path: TFDS dataset "
                                    "'no_such_dataset_xyz' not found"), msg


def test_missing_tokenizer_file(tmp_path, capsys):
  rc, msg = _train(tmp_path, capsys, f"--config.data.tokenizer={tmp_path / 'tok.json'}")
  assert rc == 2 and "tokenizer" in msg and str(tmp_path / "tok.json") in msg, msg


# --------------------------------------------------------------------------- checkpoints
def test_tokenizer_vocab_larger_than_the_model(tmp_path, capsys):
  rc, msg = _train(tmp_path, capsys, "--config.model.overrides.vocab_size=200")
  assert rc == 2 and msg.startswith("lora-jax train: data error: data.tokenizer: tokenizer "
                                    "'byte' has vocab 259 > model vocab_size 200"), msg


def _save_tiny_hf(path, **overrides):
  import jax

  from lora_jax.config import preset
  from lora_jax.interop.hf import save_hf
  from lora_jax.model import init_params
  cfg = preset("tiny").replace(**overrides)
  save_hf(str(path), cfg, init_params(cfg, jax.random.key(0)))
  return str(path)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  return _save_tiny_hf(tmp_path_factory.mktemp("hf") / "tiny")


def test_eval_tokenizer_vocab_larger_than_the_model(tmp_path, capsys):
  small = _save_tiny_hf(tmp_path / "small_vocab", vocab_size=200)
  d = tmp_path / "data" / "humaneval"
  d.mkdir(parents=True)
  (d / "HumanEval.jsonl").write_text(open(os.path.join(FIXTURES, "humaneval",
                                                       "problems.jsonl")).read())
  rc = cli.main(["eval", "--model", small, "--tokenizer", "byte", "--tasks", "humaneval",
                 "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert rc == 2 and "--tokenizer: tokenizer 'byte' has vocab 259 > model vocab_size 200" in err
  assert "Traceback" not in err


def test_hf_model_path_with_a_bad_config_json(tmp_path, capsys):
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
  rc, msg = _train(tmp_path, capsys, f"--config.model.hf_path={tmp_path / 'm'}")
  assert rc == 2 and msg.startswith("lora-jax train: config error: model.hf_path: "), msg
  assert str(tmp_path / "m") in msg and "vocab_size" in msg, msg


@pytest.mark.parametrize("key, value, words", [
    ("hidden_size", "64", "hidden_size: expected a positive integer, got '64'"),
    ("num_hidden_layers", -1, "num_hidden_layers: expected a positive integer, got -1"),
    ("rms_norm_eps", "tiny", "rms_norm_eps: expected a positive number"),
])
def test_hf_config_json_with_a_bad_value_names_the_key(tiny_hf, tmp_path, capsys, key, value,
                                                       words):
  model = tmp_path / "m"
  shutil.copytree(tiny_hf, model)
  hf_config = json.loads((model / "config.json").read_text())
  hf_config[key] = value
  (model / "config.json").write_text(json.dumps(hf_config))
  rc, msg = _train(tmp_path, capsys, f"--config.model.hf_path={model}")
  assert rc == 2 and str(model / "config.json") in msg and words in msg, msg
  # The same file through `lora-jax convert`: one line, the file and the key.
  assert cli.main(["convert", str(model), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and str(model / "config.json") in err and words in err, err


def test_hf_model_path_without_weights(tiny_hf, tmp_path, capsys):
  (tmp_path / "m").mkdir()
  shutil.copy(os.path.join(tiny_hf, "config.json"), tmp_path / "m" / "config.json")
  rc, msg = _train(tmp_path, capsys, f"--config.model.hf_path={tmp_path / 'm'}")
  assert rc == 2 and msg.startswith("lora-jax train: config error: model.hf_path: "), msg
  assert str(tmp_path / "m") in msg and "safetensors" in msg, msg


# --------------------------------------------------------------------------- eval
def _eval(tiny_hf, tmp_path, capsys, data_dir, tasks, *extra):
  rc = cli.main(["eval", "--model", tiny_hf, "--tokenizer", "byte", "--tasks", tasks,
                 "--data-dir", str(data_dir), "--out", str(tmp_path / "out"), "--quiet",
                 "--limit", "2", *extra])
  err = capsys.readouterr().err
  assert err.startswith("lora-jax eval: ") or "\nlora-jax eval: " in err, err
  assert "Traceback" not in err, err
  return rc, err


def test_eval_missing_task_data_names_the_expected_file(tiny_hf, tmp_path, capsys):
  (tmp_path / "empty_dir").mkdir()  # exists (a missing --data-dir is refused while parsing)
  rc, msg = _eval(tiny_hf, tmp_path, capsys, tmp_path / "empty_dir", "gsm8k,hellaswag")
  assert rc == 2
  assert os.path.join(str(tmp_path / "empty_dir"), "gsm8k/test.jsonl") in msg, msg
  assert os.path.join(str(tmp_path / "empty_dir"), "hellaswag/validation.jsonl") in msg, msg
  assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("row, words", [
    ({"task_id": "X/0", "prompt": "def f():\n", "canonical_solution": "", "entry_point": "f"},
     "missing test"),
    ({"task_id": "X/0", "prompt": 3, "canonical_solution": "", "test": "", "entry_point": "f"},
     "prompt must be a string"),
    ({"task_id": "X/0", "prompt": "", "canonical_solution": "", "test": "",
      "entry_point": "not an identifier"}, "is not a Python identifier"),
])
def test_eval_malformed_humaneval_problem_names_file_and_line(tiny_hf, tmp_path, capsys, row,
                                                               words):
  d = tmp_path / "data" / "humaneval"
  d.mkdir(parents=True)
  good = open(os.path.join(FIXTURES, "humaneval", "problems.jsonl")).readline()
  (d / "HumanEval.jsonl").write_text(good + "\n" + json.dumps(row) + "\n")
  rc, msg = _eval(tiny_hf, tmp_path, capsys, tmp_path / "data", "humaneval")
  assert rc == 2 and f"{d / 'HumanEval.jsonl'}:3: " in msg and words in msg, msg
  assert not (tmp_path / "out" / "results.json").exists()


def test_eval_malformed_gsm8k_row_names_file_and_line(tiny_hf, tmp_path, capsys):
  d = tmp_path / "data" / "gsm8k"
  d.mkdir(parents=True)
  (d / "test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2\n#### 2"}) + "\n" +
                                json.dumps({"question": "2+2?", "answer": "four"}) + "\n")
  rc, msg = _eval(tiny_hf, tmp_path, capsys, tmp_path / "data", "gsm8k", "--num-fewshot",
                  "gsm8k=0")
  assert rc == 2 and f"{d / 'test.jsonl'}:2: answer has no '#### <number>'" in msg, msg


def _gsm8k_problems():
  from lora_jax.evals import gsm8k
  from lora_jax.evals.task_data import read_rows
  return gsm8k.parse_problems(read_rows(os.path.join(FIXTURES, "evals", "gsm8k", "test.jsonl")))


def test_empty_generations_score_zero_and_are_recorded():
  from lora_jax.evals import gsm8k, humaneval
  problems = _gsm8k_problems()
  entries, rows = gsm8k.evaluate_gsm8k(lambda prompts, **kw: [[""] for _ in prompts], problems,
                                       num_fewshot=0)
  by = {e["metric"]: e["value"] for e in entries}
  assert by["strict_match"] == 0.0 and by["flexible_match"] == 0.0
  assert all(r["generation"] == "" and r["strict_pred"] == "[invalid]" for r in rows)
  path = os.path.join(FIXTURES, "humaneval", "problems.jsonl")
  entries = humaneval.evaluate_humaneval(
      lambda prompts, n, **kw: [[""] * n for _ in prompts], problems_path=path, n_samples=1)
  assert {e["metric"]: e["value"] for e in entries}["pass@1"] == 0.0


def test_generator_returning_no_completion_is_a_clear_error():
  """A generate_fn that returns an empty list for a prompt (not an empty string) is a bug in the
  generator: name it instead of an IndexError deep in scoring."""
  from lora_jax.evals import gsm8k, humaneval
  problems = _gsm8k_problems()
  with pytest.raises(ValueError, match="completion"):
    gsm8k.evaluate_gsm8k(lambda prompts, **kw: [[] for _ in prompts], problems, num_fewshot=0)
  path = os.path.join(FIXTURES, "humaneval", "problems.jsonl")
  with pytest.raises(ValueError, match="completions for prompt 0, expected n=1"):
    humaneval.evaluate_humaneval(lambda prompts, n, **kw: [[] for _ in prompts],
                                 problems_path=path, n_samples=1)
