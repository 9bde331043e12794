"""Training with output_dir on gs:// against the GCS emulator (tests/_gcs_support.py): every run
file lands as an object and nothing in a local `gs:` folder; a run SIGKILLed mid-save resumes on
a "fresh VM" (another, empty working directory) bitwise equal to a straight run; the storage
going down mid-save is a clear error that keeps the previous checkpoint, and the run resumes
once the storage is back."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import numpy as np
import pytest

from _fault_support import (RUN_ARGS, deterministic, env, resumed_step, tail, train_cmd)
from _gcs_support import GcsEmulator, local_gs_dirs, reset_clients
from _train_support import StandInData, tiny_cfg
from lora_jax import fileio
from lora_jax.train import restore_run, train


def _metrics(out: str) -> list[dict]:
  return [json.loads(ln) for ln in fileio.read_text(fileio.join(out, "metrics.jsonl")).splitlines()]


def _flat(tree) -> dict:
  import jax
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _sha256(path: str) -> str:
  return hashlib.sha256(fileio.read_bytes(path)).hexdigest()


@pytest.fixture
def fresh_cwd(tmp_path, monkeypatch):
  """An empty working directory (a relative `gs:/...` write would land here)."""
  d = tmp_path / "cwd"
  d.mkdir()
  monkeypatch.chdir(d)
  return d


def test_lora_run_on_gs_writes_every_file_as_an_object(gcs_url, fresh_cwd, tmp_path):
  out = fileio.join(gcs_url, "run")
  cfg = tiny_cfg(steps=3, checkpoint_every=2, export="adapter", tensorboard=True)
  cfg.output_dir = out
  result = train(cfg, data_iter=StandInData(8, 32))
  assert result.output_dir == out and result.checkpoint_dir == fileio.join(out, "checkpoints")
  assert fileio.listdir(out) == ["checkpoints", "config.json", "export", "metrics.jsonl",
                                 "tensorboard"]
  assert fileio.read_json(fileio.join(out, "config.json"), "config")["output_dir"] == out
  assert [r["step"] for r in _metrics(out)] == [1, 2, 3]
  assert fileio.checkpoint_steps(fileio.join(out, "checkpoints")) == [2, 3]
  assert fileio.listdir(fileio.join(out, "export", "adapter")) == [
      "adapter_config.json", "adapter_model.safetensors"]
  assert [n for n in fileio.listdir(fileio.join(out, "tensorboard")) if "tfevents" in n]
  assert result.exports == {"adapter": fileio.join(out, "export", "adapter")}
  assert list(fresh_cwd.iterdir()) == [] and local_gs_dirs(str(tmp_path)) == []
  _, _, params, meta = restore_run(out)  # reads config.json and the checkpoint from the bucket
  assert meta["step"] == 3
  want = _flat(result.params)
  for k, x in _flat(params).items():
    np.testing.assert_array_equal(x, want[k])


def test_full_ft_run_on_gs_exports_hf_as_objects(gcs_url, fresh_cwd, tmp_path):
  out = fileio.join(gcs_url, "full")
  cfg = tiny_cfg(lora=False, steps=2, export="hf")
  cfg.output_dir = out
  train(cfg, data_iter=StandInData(8, 32))
  assert fileio.listdir(fileio.join(out, "export", "hf")) == ["config.json", "model.safetensors"]
  assert fileio.checkpoint_steps(fileio.join(out, "checkpoints")) == [2]
  assert [r["step"] for r in _metrics(out)] == [1, 2]
  assert list(fresh_cwd.iterdir()) == [] and local_gs_dirs(str(tmp_path)) == []


class _SigtermAt(StandInData):
  def __init__(self, *a, at: int, **kw):
    super().__init__(*a, **kw)
    self.at = at

  def __next__(self):
    if self.step == self.at:
      import signal
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def test_preempted_run_on_gs_resumes_with_each_metrics_row_once(gcs_url, fresh_cwd):
  """metrics.jsonl on an object store: rewritten before each checkpoint; rows past the restored
  checkpoint (here step 4, logged after the step-3 save) are dropped on resume."""
  out = fileio.join(gcs_url, "pre")
  cfg = tiny_cfg(steps=5, checkpoint_every=3)
  cfg.output_dir = out
  straight_cfg = tiny_cfg(steps=5)
  straight_cfg.output_dir = fileio.join(gcs_url, "straight")
  straight = train(straight_cfg, data_iter=StandInData(8, 32))
  first = train(cfg, data_iter=_SigtermAt(8, 32, at=3))
  assert first.preempted and first.step == 4
  assert fileio.checkpoint_steps(fileio.join(out, "checkpoints")) == [3, 4]
  # a crash after a checkpoint: the step-4 checkpoint goes, metrics keep the step-4 row
  fileio.rmtree(fileio.join(out, "checkpoints", "4"))
  second = train(cfg, data_iter=StandInData(8, 32))
  assert second.step == 5
  assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4, 5]
  assert [r["loss"] for r in _metrics(out)] == [r["loss"] for r in straight.metrics]
