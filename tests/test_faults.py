"""Training under faults, end to end through `lora-jax train` in subprocesses (configs/tiny_lora.py,
12 steps, a checkpoint every 2, async checkpointing):

  - SIGKILL at 5 seeded random points (between steps, mid-save, mid-commit, during an async
    commit): every restart resumes from the newest committed checkpoint, and the final state and
    the whole loss sequence equal an uninterrupted run bitwise;
  - a committed newest checkpoint that was later truncated: the run resumes from the one before;
  - SIGTERM: a checkpoint of the step reached and exit code 143 at the next step, then the
    next start resumes;
  - NaN loss: exit 1 naming the step, nothing saved past the last good checkpoint;
  - disk full while a checkpoint commits: exit 1 naming the last complete one, then resume;
  - a different config in the same output_dir: refused with the changed keys, unless --force;
  - an unwritable output_dir or too little disk: a clear error before training starts.

One uninterrupted reference run (module fixture) serves every comparison.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

import _fault_support as fs


SEED = int(os.environ.get("LORA_JAX_FAULT_SEED", "0"))
STEPS, EVERY = 12, 2


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  out = tmp_path_factory.mktemp("reference")
  proc = fs.run_train(out, *fs.RUN_ARGS)
  assert proc.returncode == 0, fs.tail(proc)
  assert fs.resumed_step(proc.stderr) is None
  records = fs.metrics(out)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  return {"dir": out, "metrics": fs.deterministic(records),
          "state": fs.checkpoint_state(out, STEPS)}


def _copy(reference, tmp_path):
  out = tmp_path / "run"
  shutil.copytree(reference["dir"], out)
  return out


def kill_plan(seed: int) -> list[tuple[str, int]]:
  """Five (fault point, step) pairs in increasing step order, one per window of steps; every
  fault point appears at least once (save/commit/async only at checkpoint steps)."""
  rng = random.Random(seed)
  modes = ["step", "save", "commit", "async", rng.choice(["step", "save", "commit", "async"])]
  rng.shuffle(modes)
  windows = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10, 11, 12]]
  plan = []
  for mode, window in zip(modes, windows):
    choices = window if mode == "step" else [s for s in window if s % EVERY == 0]
    plan.append((mode, rng.choice(choices)))
  return plan


def _allowed_resume(mode: str, step: int) -> set:
  """The newest committed checkpoint after SIGKILL at (mode, step), None for none."""
  def prev(s):  # the checkpoint step before step s
    c = (s - 1) // EVERY * EVERY
    return c or None
  if mode in ("save", "commit"):
    return {prev(step)}  # the checkpoint being written was never committed
  if mode == "async":
    return {step, prev(step)}  # its commit may or may not have finished
  # before step `step`: the last checkpoint's async commit may still have been in flight
  last = prev(step)
  return {last, prev(last) if last else None}


@pytest.mark.slow
def test_sigkill_at_five_points_resumes_bitwise(reference, tmp_path):
  out = tmp_path / "run"
  plan = kill_plan(SEED)
  log = [f"seed {SEED}, plan {plan}"]
  expected_resume, newest = None, None
  for mode, step in plan + [(None, None)]:
    proc = fs.run_train(out, *fs.RUN_ARGS, kill=f"{mode}:{step}" if mode else None)
    resumed = fs.resumed_step(proc.stderr)
    log.append(f"{mode}:{step}: resumed from {resumed}, rc {proc.returncode}, "
               f"committed after {fs.committed_steps(out)}")
    # Resumes from exactly the newest checkpoint that was committed when the last run died.
    assert resumed == expected_resume, "\n".join(log) + "\n" + fs.tail(proc)
    if mode is None:
      assert proc.returncode == 0, "\n".join(log) + "\n" + fs.tail(proc)
      break
    assert proc.returncode == -signal.SIGKILL, "\n".join(log) + "\n" + fs.tail(proc)
    assert f"FAULT: SIGKILL at {mode}:{step}" in proc.stderr
    committed = fs.committed_steps(out)
    expected_resume = max(committed) if committed else None
    assert expected_resume in _allowed_resume(mode, step), "\n".join(log)
    # A committed checkpoint is never lost: the newest one only moves forward.
    assert newest is None or (expected_resume or 0) >= newest, "\n".join(log)
    newest = expected_resume
  records = fs.metrics(out)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "\n".join(log)
  assert fs.deterministic(records) == reference["metrics"], "\n".join(log)  # exact floats
  fs.assert_same_state(fs.checkpoint_state(out, STEPS), reference["state"])
  assert fs.temp_dirs(out) == [], "\n".join(log)  # torn saves were cleaned up


def test_kill_plan_covers_every_fault_point_in_step_order():
  for seed in range(20):
    plan = kill_plan(seed)
    steps = [s for _, s in plan]
    assert len(plan) == 5 and steps == sorted(set(steps)) and steps[-1] <= STEPS
    assert {m for m, _ in plan} == {"step", "save", "commit", "async"}
    assert all(s % EVERY == 0 for m, s in plan if m != "step")


def _truncate_arrays(state_dir):
  """Empties every array-data file of a checkpoint's state item, as a crash before the data
  reached the disk leaves it. Every file, not only the largest: ocdbt can leave unreferenced
  data files behind, whose damage is harmless. And to zero bytes, not to a fraction: ocdbt's
  concurrent writes place the referenced bytes anywhere in a file, sometimes all within its
  first third, so a partial cut left the checkpoint readable in about 1 run in 8."""
  data = os.path.join(state_dir, "ocdbt.process_0", "d")
  for name in os.listdir(data):
    os.truncate(os.path.join(data, name), 0)


@pytest.mark.slow
def test_truncated_newest_checkpoint_resumes_from_the_previous_one(reference, tmp_path):
  out = _copy(reference, tmp_path)
  assert fs.committed_steps(out)[-2:] == [STEPS - EVERY, STEPS]
  _truncate_arrays(out / "checkpoints" / str(STEPS) / "state")
  proc = fs.run_train(out, *fs.RUN_ARGS)
  assert proc.returncode == 0, fs.tail(proc)
  assert fs.resumed_step(proc.stderr) == STEPS - EVERY, fs.tail(proc)
  assert f"checkpoint {STEPS}" in proc.stderr and "unreadable" in proc.stderr, fs.tail(proc)
  # the damaged checkpoint is kept aside for inspection, not deleted
  assert os.listdir(out / "checkpoints_unreadable") == [str(STEPS)]
  assert fs.deterministic(fs.metrics(out)) == reference["metrics"]
  fs.assert_same_state(fs.checkpoint_state(out, STEPS), reference["state"])


def _two_checkpoints(out):
  """An in-process 2-step run with checkpoints 1 and 2 (sync saves); returns train's args."""
  from _train_support import StandInData, tiny_cfg
  from lora_jax.training import train
  cfg = tiny_cfg(out, steps=2, checkpoint_every=1)
  train(cfg, data_iter=StandInData(8, 32))
  assert fs.committed_steps(out) == [1, 2]
  return cfg, lambda: train(cfg, data_iter=StandInData(8, 32))


def _damage(step_dir, how):
  if how == "data item cut short":
    f = step_dir / "data" / "process_0-of-1.json"
    f.write_text(f.read_text()[:5])
  elif how == "state metadata deleted":
    (step_dir / "state" / "_METADATA").unlink()
  elif how == "state arrays truncated":
    _truncate_arrays(step_dir / "state")


@pytest.mark.parametrize("how", ["data item cut short", "state metadata deleted",
                                 "state arrays truncated"])
def test_damaged_newest_checkpoint_falls_back_and_redoes_the_step(tmp_path, how, caplog):
  out = tmp_path / "run"
  cfg, again = _two_checkpoints(out)
  good = fs.checkpoint_state(out, 2)
  _damage(out / "checkpoints" / "2", how)
  result = again()
  assert "checkpoint 2 in" in caplog.text and "is unreadable" in caplog.text
  assert [m["step"] for m in result.metrics if "loss" in m] == [2]  # resumed from 1
  assert os.listdir(out / "checkpoints_unreadable") == ["2"]
  assert fs.committed_steps(out) == [1, 2]
  fs.assert_same_state(fs.checkpoint_state(out, 2), good)


def test_no_readable_checkpoint_is_a_clear_error_and_moves_nothing(tmp_path):
  from lora_jax.training import TrainingError
  out = tmp_path / "run"
  cfg, again = _two_checkpoints(out)
  _damage(out / "checkpoints" / "1", "state metadata deleted")
  _damage(out / "checkpoints" / "2", "data item cut short")
  with pytest.raises(TrainingError, match="no checkpoint in .* can be restored") as e:
    again()
  assert "step 2: " in str(e.value) and "step 1: " in str(e.value)
  assert fs.committed_steps(out) == [1, 2] and not (out / "checkpoints_unreadable").exists()


# SIGTERM timing. A preempting scheduler gives a grace period (30 s on GCE spot / preemptible VMs)
# in which the run must finish the step in flight, write one checkpoint and exit; for this tiny
# run that takes a few seconds on an idle core. The bound below is that grace period doubled,
# because this suite shares 2 CPU cores with other jobs; that the run stops at the next step
# (not at the end of training) is asserted by step count, which load cannot change.
SIGTERM_EXIT_S = 60
STEP_SLEEP_S = 0.3  # makes every step this much slower, so the signal lands mid-run
STARTUP_S = 300  # imports + first compilations before 3 steps are logged, on a loaded machine


@pytest.mark.slow
def test_sigterm_saves_exits_preempted_and_the_next_start_resumes(reference, tmp_path):
  out = tmp_path / "run"
  e = fs.env(LORA_JAX_TEST_STEP_SLEEP=STEP_SLEEP_S)
  # no periodic checkpoints: the one checkpoint on disk afterwards is the SIGTERM save
  cmd = fs.train_cmd(out, *fs.RUN_ARGS, "--config.train.checkpoint_every=0", faults=True)
  proc = subprocess.Popen(cmd, env=e, cwd=fs.ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + STARTUP_S
    while len(fs.metrics(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    assert proc.poll() is None, "the run ended before SIGTERM could be sent"
    logged = fs.metrics(out)[-1]["step"]
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=4 * SIGTERM_EXIT_S)  # a hang fails, not blocks
    took = time.monotonic() - sent
  finally:
    if proc.poll() is None:
      proc.kill()
  first = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
  assert proc.returncode == 143, fs.tail(first)  # EXIT_PREEMPTED
  assert took < SIGTERM_EXIT_S, took
  assert "preempted" in stderr, fs.tail(first)
  stopped = fs.metrics(out)[-1]["step"]
  # Metrics lag one step behind the step in flight, and the signal is seen at the next step
  # boundary: at most 2 steps past the last line logged when it was sent (+1 for a line
  # written between reading the file and sending the signal).
  assert 3 <= logged <= stopped <= logged + 3 and stopped < STEPS, (logged, stopped)
  assert fs.committed_steps(out) == [stopped], fs.tail(first)
  second = fs.run_train(out, *fs.RUN_ARGS)
  assert second.returncode == 0 and fs.resumed_step(second.stderr) == stopped, fs.tail(second)
  assert fs.deterministic(fs.metrics(out)) == reference["metrics"]
  fs.assert_same_state(fs.checkpoint_state(out, STEPS), reference["state"])


@pytest.mark.slow
def test_nan_loss_exits_naming_the_step_and_keeps_the_good_checkpoint(tmp_path):
  # LionW moves every LoRA weight by lr * sign(g): with lr=1e30 (0 at step 1, warmup) step 2
  # is finite and puts 1e30 in the weights; step 3 overflows.
  proc = fs.run_train(tmp_path, *fs.RUN_ARGS, "--config.optimizer.lr=1e30",
                      "--config.train.checkpoint_every=1")
  assert proc.returncode == 1, fs.tail(proc)
  err = [ln for ln in proc.stderr.splitlines() if ln.startswith("lora-jax train:")]
  assert len(err) == 1 and err[0].startswith("lora-jax train: step 3: loss=nan"), fs.tail(proc)
  assert "not finite" in err[0] and "last good checkpoint: 2" in err[0], fs.tail(proc)
  assert "Traceback" not in proc.stderr, fs.tail(proc)
  # checkpoint 2's async commit was in flight when step 3 failed: it must still be committed
  assert fs.committed_steps(tmp_path) == [1, 2] and fs.temp_dirs(tmp_path) == [], fs.tail(proc)
  assert [r["step"] for r in fs.metrics(tmp_path)] == [1, 2]


@pytest.mark.slow
def test_changed_config_is_refused_with_the_key_diff_unless_forced(reference, tmp_path):
  out = _copy(reference, tmp_path)
  before = {p: (out / p).read_bytes() for p in ("config.json", "metrics.jsonl")}
  proc = fs.run_train(out, *fs.RUN_ARGS, "--config.optimizer.lr=0.001",
                      "--config.lora.rank=4", "--config.train.steps=13")
  assert proc.returncode == 1, fs.tail(proc)
  err = proc.stderr
  assert "different config" in err and "--force" in err, fs.tail(proc)
  assert "optimizer.lr: 0.003 (saved) -> 0.001 (now)" in err, fs.tail(proc)
  assert "lora.rank: 8 (saved) -> 4 (now)" in err and "train.steps: 12 (saved) -> 13 (now)" in err
  assert "Traceback" not in err
  # the refused run changed nothing on disk
  assert {p: (out / p).read_bytes() for p in before} == before
  assert fs.committed_steps(out)[-1] == STEPS
  # --force resumes (a longer run at another LR: the LoRA rank is the checkpoint's)
  proc = fs.run_train(out, *fs.RUN_ARGS, "--config.optimizer.lr=0.001",
                      "--config.train.steps=13", "--force")
  assert proc.returncode == 0 and fs.resumed_step(proc.stderr) == STEPS, fs.tail(proc)
  assert [r["step"] for r in fs.metrics(out)] == list(range(1, STEPS + 2))
  assert fs.metrics(out)[:STEPS] == [json.loads(ln) for ln in
                                     before["metrics.jsonl"].decode().splitlines()]


@pytest.mark.slow
def test_disk_full_mid_run_is_a_clear_error_and_the_next_start_resumes(reference, tmp_path):
  out = tmp_path / "run"
  # checkpoint 4's async commit fails with ENOSPC; the error surfaces at the save of 6
  proc = fs.run_train(out, *fs.RUN_ARGS, extra_env={"LORA_JAX_TEST_ENOSPC": 4})
  assert proc.returncode == 1, fs.tail(proc)
  line = [ln for ln in proc.stderr.splitlines() if ln.startswith("lora-jax train:")]
  assert len(line) == 1 and "No space left on device" in line[0], fs.tail(proc)
  assert "the last complete checkpoint is 2" in line[0], line
  assert fs.committed_steps(out) == [2]
  proc = fs.run_train(out, *fs.RUN_ARGS)
  assert proc.returncode == 0 and fs.resumed_step(proc.stderr) == 2, fs.tail(proc)
  assert fs.deterministic(fs.metrics(out)) == reference["metrics"]
  fs.assert_same_state(fs.checkpoint_state(out, STEPS), reference["state"])


def test_torn_metrics_line_and_steps_past_the_checkpoint_are_dropped_on_resume(tmp_path):
  """SIGKILL can cut metrics.jsonl mid-line, after steps the checkpoint does not hold."""
  from lora_jax.metrics import MetricsWriter
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6))
                  + '{"step": 6, "lo')
  writer = MetricsWriter(str(tmp_path), tensorboard=False, initial_step=4, progress=False)
  writer.write({"step": 5, "loss": 0.5})
  writer.close()
  assert [r["step"] for r in fs.metrics(tmp_path)] == [1, 2, 3, 4, 5]
  assert fs.metrics(tmp_path)[-1]["loss"] == 0.5


def test_unwritable_output_dir_is_a_clear_error_before_training(tmp_path, capsys):
  from lora_jax.cli import main
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  for out in (blocker / "run", "/proc/lora_jax_no_such_run"):
    rc = main(["train", "--config", fs.TINY_LORA, f"--config.output_dir={out}", *fs.RUN_ARGS])
    err = capsys.readouterr().err
    assert rc == 1 and f"lora-jax train: output_dir: cannot write to '{out}'" in err, err
  assert blocker.read_text() == "x"


def test_too_little_disk_is_a_clear_error_before_training(tmp_path, capsys, monkeypatch):
  from lora_jax.cli import main
  from lora_jax.training import resume
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(resume.shutil, "disk_usage",
                      lambda p: usage._replace(free=1000))
  rc = main(["train", "--config", fs.TINY_LORA, f"--config.output_dir={tmp_path / 'run'}",
             *fs.RUN_ARGS])
  err = capsys.readouterr().err
  assert rc == 1 and "GiB free but one checkpoint needs" in err, err
  assert not (tmp_path / "run" / "checkpoints").exists()
