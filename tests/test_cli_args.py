"""Bad command-line values are refused while parsing, before any work, with one line and exit 2."""

import pytest

from lora_jax import cli


def _fails(capsys, argv, *needles):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err, "no error message"
  line = err[-1]
  for needle in needles:
    assert needle in line, line
  assert "Traceback" not in "\n".join(err)
  return line


EVAL = ["eval", "--model", "m", "--out", "o"]


@pytest.mark.parametrize("flag,value,needle", [
    ("--limit", "-1", "positive integer"),
    ("--limit", "0", "positive integer"),
    ("--workers", "0", "positive integer"),
    ("--batch-size", "x", "positive integer"),
    ("--humaneval-samples", "0", "positive integer"),
    ("--humaneval-temperature", "-0.5", ">= 0"),
    ("--humaneval-top-p", "1.5", "(0, 1]"),
])
def test_eval_rejects_bad_numbers(capsys, flag, value, needle):
  _fails(capsys, EVAL + [flag, value], flag, needle)


def test_eval_data_dir_must_be_a_directory(capsys, tmp_path):
  f = tmp_path / "a_file"
  f.write_text("x")
  _fails(capsys, EVAL + ["--data-dir", str(f)], "--data-dir", "not a directory")
  _fails(capsys, EVAL + ["--data-dir", str(tmp_path / "missing")], "--data-dir", "no such")


def test_eval_out_must_not_be_a_file(capsys, tmp_path):
  f = tmp_path / "results"
  f.write_text("x")
  _fails(capsys, ["eval", "--model", "m", "--out", str(f)], "--out", "not a directory")


def test_eval_unknown_fewshot_task_is_refused_before_loading(capsys, tmp_path):
  # --model does not exist: the few-shot spec must be rejected first, naming the task.
  rc = cli.main(["eval", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                 "--tasks", "gsm8k", "--num-fewshot", "gsm8k=5,hellaswagg=3"])
  assert rc == 2
  err = capsys.readouterr().err
  assert "--num-fewshot" in err and "hellaswagg" in err
  assert not (tmp_path / "o").exists()


def test_analyze_rejects_bad_layers_and_out(capsys, tmp_path):
  base = ["analyze", "--base", "b", "--finetuned", "f"]
  _fails(capsys, base + ["--out", str(tmp_path), "--layers", "0,x"], "--layers", "'x'")
  _fails(capsys, base + ["--out", str(tmp_path), "--layers", "-1"], "--layers")
  f = tmp_path / "existing"
  f.write_text("keep me")
  _fails(capsys, base + ["--out", str(f)], "--out", "not a directory")
  assert f.read_text() == "keep me"
  _fails(capsys, base + ["--out", str(tmp_path), "--variance", "0"], "--variance")


def test_url_paths_are_left_to_the_filesystem_layer():
  from lora_jax.commands import argtypes
  assert argtypes.output_dir("gs://bucket/run") == "gs://bucket/run"
  assert argtypes.existing_dir("gs://bucket/data") == "gs://bucket/data"
