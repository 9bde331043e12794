"""Shared by the training tests: a tiny run config and a deterministic stand-in batch stream.

`StandInData` yields this process's rows of a global batch that depends only on (seed, step), so
runs with different meshes, microbatch counts or process counts see the same global data (the
loss is a sum over rows, so the row order across processes does not matter).
"""

from __future__ import annotations

import os
import signal
import tempfile

import jax
import numpy as np

from lora_jax.config import default_config

# Every train() builds fresh jitted closures; the persistent cache turns their identical
# recompilations (seconds each on a loaded CPU) into disk reads. Subprocesses get it via env.
COMPILE_CACHE = os.path.join(tempfile.gettempdir(), "lora_jax_test_compile_cache")
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": COMPILE_CACHE,
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2"}
jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def tiny_cfg(tmp_path=None, *, lora: bool = True, steps: int = 3, **train):
  c = default_config()
  c.output_dir = str(tmp_path or "/tmp/lora_jax_test_run")
  c.model.preset = "tiny"
  c.lora.enabled = lora
  c.lora.rank = 4
  c.lora.dropout = 0.0
  c.optimizer.name = "lionw"
  c.optimizer.lr = 3e-3
  c.schedule.warmup_fraction = 0.0
  c.schedule.warmup_steps = 1
  c.train.steps = steps
  c.train.global_batch = 8
  c.train.seq_len = 32
  c.train.log_every = 1
  c.train.export = "none"
  c.train.tensorboard = False
  c.train.async_checkpointing = False
  c.mesh.data = -1
  for k, v in train.items():
    c.train[k] = v
  return c


class StandInData:
  """Learnable packed rows: two documents per row of arithmetic token sequences; the first
  quarter of each row is "prompt" (loss_mask 0); the last row slots are padding."""

  def __init__(self, global_batch: int, seq_len: int, seed: int = 0, process_index: int = 0,
               process_count: int = 1, vocab: int = 256):
    assert global_batch % process_count == 0
    self.global_batch, self.seq_len, self.seed = global_batch, seq_len, seed
    self.process_index, self.process_count, self.vocab = process_index, process_count, vocab
    self.step = 0
    self.batches_per_epoch = 1000

  def global_batch_at(self, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, step])
    B, L = self.global_batch, self.seq_len
    start = rng.integers(3, self.vocab, (B, 1))
    stride = rng.integers(1, 4, (B, 1))
    tokens = (start + stride * np.arange(L)) % (self.vocab - 3) + 3
    cut = L // 2
    segment_ids = np.where(np.arange(L) < cut, 1, 2) * np.ones((B, 1), np.int64)
    segment_ids[:, L - 3:] = 0
    tokens = np.where(segment_ids == 0, 0, tokens)
    positions = np.where(np.arange(L) < cut, np.arange(L), np.arange(L) - cut)
    positions = positions * np.ones((B, 1), np.int64)
    loss_mask = (np.arange(L) >= L // 4).astype(np.int64) * np.ones((B, 1), np.int64)
    return {k: v.astype(np.int32) for k, v in dict(
        tokens=tokens, positions=positions, segment_ids=segment_ids, loss_mask=loss_mask).items()}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.global_batch_at(self.step)
    self.step += 1
    n = self.global_batch // self.process_count
    lo = self.process_index * n
    return {k: v[lo:lo + n] for k, v in batch.items()}

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = int(state["step"])


class SigtermAt(StandInData):
  """Sends this process SIGTERM while producing batch `at` (0-based)."""

  def __init__(self, *a, at: int, **kw):
    super().__init__(*a, **kw)
    self.at = at

  def __next__(self):
    if self.step == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()
