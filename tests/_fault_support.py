"""Shared by the fault and bad-input tests: `lora-jax train` in a subprocess and readers for what a
run leaves on disk (metrics.jsonl, committed checkpoint steps, a checkpoint's TrainState)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np

from _train_support import CACHE_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LORA = os.path.join(ROOT, "configs", "tiny_lora.py")
FAULT_CHILD = os.path.join(ROOT, "tests", "_fault_child.py")
# The fault tests' run: the shipped tiny LoRA config (async checkpoints, LoRA dropout on),
# shortened to 12 steps with a checkpoint every 2.
RUN_ARGS = ("--config.train.steps=12", "--config.train.checkpoint_every=2",
            "--config.train.log_every=1", "--config.train.export=none",
            "--config.train.tensorboard=false")
# What must match an uninterrupted run bitwise (timings are excluded).
DETERMINISTIC = ("step", "tokens", "epoch", "loss", "grad_norm", "lr", "loss_tokens")


def env(**extra) -> dict:
  e = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **CACHE_ENV)
  for k in [k for k in e if k.startswith("LORA_JAX_TEST_")]:
    del e[k]
  e.update({k: str(v) for k, v in extra.items()})
  return e


def train_cmd(out_dir, *args, config: str = TINY_LORA, faults: bool = False) -> list[str]:
  """argv of `lora-jax train` (through tests/_fault_child.py when `faults`)."""
  head = [sys.executable, FAULT_CHILD] if faults else [sys.executable, "-m", "lora_jax.cli"]
  return head + ["train", "--config", config, f"--config.output_dir={out_dir}", *args]


def run_train(out_dir, *args, kill: str | None = None, timeout: float = 300,
              extra_env: dict | None = None, **kw) -> subprocess.CompletedProcess:
  e = env(**(extra_env or {}))
  if kill:
    e["LORA_JAX_TEST_KILL"] = kill
  faults = any(k.startswith("LORA_JAX_TEST_") for k in e)
  return subprocess.run(train_cmd(out_dir, *args, faults=faults, **kw), env=e, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def metrics(out_dir) -> list[dict]:
  path = os.path.join(out_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(ln) for ln in f if ln.strip()]


def deterministic(records: list[dict]) -> list[dict]:
  return [{k: r.get(k) for k in DETERMINISTIC} for r in records if "loss" in r]


def committed_steps(out_dir) -> list[int]:
  """Steps of the finalized checkpoints (orbax renames `<step>.orbax-checkpoint-tmp*` on commit)."""
  d = os.path.join(out_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def temp_dirs(out_dir) -> list[str]:
  d = os.path.join(out_dir, "checkpoints")
  return sorted(n for n in os.listdir(d) if not n.isdigit()) if os.path.isdir(d) else []


def resumed_step(stderr: str) -> int | None:
  """The step a `lora-jax train` session resumed from (its "resumed from ... at step N" log line)."""
  m = re.findall(r"resumed from .* at step (\d+)", stderr)
  return int(m[-1]) if m else None


def checkpoint_state(out_dir, step: int) -> dict[str, np.ndarray]:
  """{path: array} of checkpoint `step`'s TrainState (step, trainable, optimizer state, rng)."""
  import orbax.checkpoint as ocp
  tree = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(out_dir), "checkpoints", str(step), "state"))
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_state(a: dict, b: dict) -> None:
  """Same leaves, shapes, dtypes and bytes (bitwise: NaN payloads and -0.0 count)."""
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    if a[k].tobytes() != b[k].tobytes():
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
      raise AssertionError(f"{k}: equal values but different bits")


def tail(proc: subprocess.CompletedProcess, n: int = 3000) -> str:
  return f"rc={proc.returncode}\n--- stderr ---\n{proc.stderr[-n:]}\n--- stdout ---\n{proc.stdout[-n:]}"
