"""launch/tpu.py's pre-flight: every training run of a job is planned for the accelerator type
before a slice is created; a run that does not fit is refused with its numbers and the overrides
that would fit (tiny preset, so the plans take seconds)."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")


def _tpu():
  spec = importlib.util.spec_from_file_location("_launch_tpu_preflight",
                                                os.path.join(ROOT, "launch", "tpu.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _up(capsys, *argv):
  rc = _tpu().main(["up", "--name", "t", "--zone", "z", "--dry-run", *argv])
  return rc, capsys.readouterr().out


TINY = ["--", "lora-jax", "train", "--config", "configs/tiny_lora.py",
        "--config.model.dtype=bfloat16"]


@needs_libtpu
def test_a_run_that_does_not_fit_is_refused_before_any_slice(capsys):
  # 2^16 sequences of 512 tokens in one microbatch: hundreds of GiB of activations per chip.
  rc, out = _up(capsys, "--accelerator-type", "v5e-4", "--preflight=analytic", *TINY,
                "--config.train.global_batch=65536", "--config.train.seq_len=512")
  assert rc == 2
  assert "DOES NOT FIT, refused" in out and "of 16.00 GiB per device" in out
  assert "fits with: --config.model.remat=" in out and "--config.train.microbatches=" in out
  assert "tpu-vm create" not in out  # refused before a slice is created


@needs_libtpu
@pytest.mark.slow
def test_a_compiled_plan_that_fits_lets_the_job_start(capsys):
  rc, out = _up(capsys, "--accelerator-type", "v5e-4", *TINY)
  assert rc == 0
  assert "preflight v5e-4: fits: lora-jax:" in out and "(compiled)" in out
  assert out.index("preflight") < out.index("tpu-vm create")


@needs_libtpu
def test_sweep_runs_that_share_a_shape_are_planned_once():
  sys.path.insert(0, ROOT)
  from lora_jax.plan import preflight
  notes = []
  base = ["lora-jax", "train", "--config", "configs/tiny_lora.py"]
  commands = [base + ["--config.optimizer.lr=1e-3", "--config.output_dir=gs://b/a"],
              base + ["--config.optimizer.lr=3e-3", "--config.output_dir=gs://b/b"],
              base + ["--config.lora.rank=4"], ["lora-jax", "eval", "--help"]]
  ok = preflight.check(commands, ["a", "b", "r4", "ev"], "v5e-4", mode="analytic",
                       repo_root=ROOT, note=notes.append)
  assert ok
  assert any("fits: a, b:" in n for n in notes) and any("fits: r4:" in n for n in notes)
  assert any("not a training command" in n for n in notes)
