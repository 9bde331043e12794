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


# --------------------------------------------------------------------------- lora-jax train in a subprocess
# The fault tests' run (tests/_fault_support.py: the shipped tiny LoRA config, 12 steps, async
# checkpoints every 2, the last 3 kept), exporting its PEFT adapter.
GS_RUN_ARGS = (*[a for a in RUN_ARGS if "export" not in a], "--config.train.export=adapter")
ADAPTER = "export/adapter/adapter_model.safetensors"
REPORT = os.environ.get("LORA_JAX_GCS_REPORT", "")  # a JSON file to write the measured run to


def _train(out: str, cwd, *, timeout: float = 400, **extra_env) -> subprocess.CompletedProcess:
  """`lora-jax train` of GS_RUN_ARGS into `out`, from working directory `cwd` (a fresh VM has
  nothing but the bucket)."""
  os.makedirs(cwd, exist_ok=True)
  faults = any(k.startswith("LORA_JAX_TEST_") for k in extra_env)
  return subprocess.run(train_cmd(out, *GS_RUN_ARGS, faults=faults), env=env(**extra_env),
                        cwd=str(cwd), capture_output=True, text=True, timeout=timeout)


def _summary(out: str) -> dict:
  rows = deterministic(_metrics(out))
  return {"rows": rows, "final_loss": rows[-1]["loss"],
          "adapter_sha256": _sha256(fileio.join(out, ADAPTER))}


@pytest.fixture(scope="module")
def straight(gcs_emulator, tmp_path_factory):
  """The uninterrupted run on gs:// (the reference the interrupted ones must equal bitwise)."""
  out = gcs_emulator.url("straight-" + os.urandom(4).hex())
  proc = _train(out, tmp_path_factory.mktemp("vm0"))
  assert proc.returncode == 0, tail(proc)
  return _summary(out)


def _vm_is_clean(*cwds) -> None:
  for cwd in cwds:
    assert list(cwd.iterdir()) == [], f"{cwd}: the run wrote to local disk"
    assert local_gs_dirs(str(cwd)) == []


@pytest.mark.slow
def test_sigkill_mid_save_then_resume_on_a_fresh_vm_is_bitwise_the_straight_run(
    straight, gcs_url, tmp_path):
  out = fileio.join(gcs_url, "killed")
  vm1, vm2 = tmp_path / "vm1", tmp_path / "vm2"
  killed = _train(out, vm1, LORA_JAX_TEST_KILL="save:6")
  assert killed.returncode == -9 and "FAULT: SIGKILL at save:6" in killed.stderr, tail(killed)
  steps = fileio.checkpoint_steps(fileio.join(out, "checkpoints"))
  assert steps == [2, 4]  # step 6's objects are in the bucket, without orbax's commit marker
  assert fileio.isdir(fileio.join(out, "checkpoints", "6"))
  resumed = _train(out, vm2)  # another machine: an empty working directory, the same bucket
  assert resumed.returncode == 0, tail(resumed)
  assert resumed_step(resumed.stderr) == 4
  got = _summary(out)
  assert [r["step"] for r in got["rows"]] == list(range(1, 13))  # each row once
  assert got["rows"] == straight["rows"]  # losses, grad norms, LRs: bitwise
  assert got["adapter_sha256"] == straight["adapter_sha256"]
  _vm_is_clean(vm1, vm2)
  if REPORT:
    with open(REPORT, "w") as f:
      json.dump({"output_dir": out, "killed_at": "save:6", "resumed_from": 4,
                 "straight": {k: straight[k] for k in ("final_loss", "adapter_sha256")},
                 "resumed": {k: got[k] for k in ("final_loss", "adapter_sha256")},
                 "losses_straight": [r["loss"] for r in straight["rows"]],
                 "losses_resumed": [r["loss"] for r in got["rows"]]}, f, indent=1)


@pytest.mark.slow
def test_storage_down_mid_save_is_a_clear_error_then_the_run_resumes(straight, tmp_path,
                                                                     monkeypatch):
  """The GCS emulator is killed inside the commit of checkpoint 4 (a network fault): training
  stops with an error naming the failed save, checkpoint 2 stays intact, and once the storage is
  back the run resumes from it and ends bitwise equal to the straight run."""
  emu = GcsEmulator(str(tmp_path / "gcs")).start()
  try:
    monkeypatch.setattr(os, "environ", {**os.environ, **emu.env()})
    reset_clients()
    out = emu.url("net")
    down = _train(out, tmp_path / "vm1", LORA_JAX_TEST_STORAGE_DOWN=f"4:{emu.proc.pid}")
    assert "FAULT: storage" in down.stderr, tail(down)
    assert down.returncode not in (0, -9), tail(down)
    assert "saving a checkpoint in gs://" in down.stderr and " failed (" in down.stderr, tail(down)
    emu.stop()
    emu.start()  # the storage is back, with what it held
    reset_clients()
    assert fileio.checkpoint_steps(fileio.join(out, "checkpoints")) == [2]
    resumed = _train(out, tmp_path / "vm2")
    assert resumed.returncode == 0, tail(resumed)
    assert resumed_step(resumed.stderr) == 2
    got = _summary(out)
    assert got["rows"] == straight["rows"]
    assert got["adapter_sha256"] == straight["adapter_sha256"]
  finally:
    emu.stop()
    reset_clients()
