"""Everything a run needs before its first step, built from the run config.

`Trainer`: model config (`lora_jax.config.model_config_from`), LoRA config, mesh,
param and state shardings, optimizer and the jitted train step are set up without allocating
params (so sizes can be checked first); `init_state` then builds the sharded state in one jitted
call from the frozen base (`base_params`, the HF dir, or the preset's seeded init) plus fresh
LoRA leaves, and fingerprints the base so checkpoints can name it. The data side: the run's
tokenizer, its batch iterator (this process's slice) and the number of steps.

Benchmarks: `t = Trainer(cfg, total_steps=n); t.init_state(); metrics = t.step(host_batch)`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lora_jax import checkpoint as ckpt
from lora_jax import config as rc
from lora_jax import fileio
from lora_jax import sharding
from lora_jax.config import LlamaConfig, model_config_from
from lora_jax.lora import (add_lora, combine_params, count_params, split_params, tree_bytes,
                           trainable_labels)
from lora_jax.model import Llama, init_params, param_logical_axes, param_shapes
from lora_jax.ops import resolve_platform
from lora_jax.optim import make_optimizer
from lora_jax.training.step import BATCH_KEYS, TrainState, make_train_step, state_shardings


# --------------------------------------------------------------------------- trainer
class Trainer:
  """Model, mesh, shardings, optimizer and the jitted step of a run (state built lazily)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, total_steps: int, mesh=None):
    self.cfg = cfg
    self.mesh = mesh or sharding.make_mesh(cfg.mesh)
    self.model_config = model_config_from(cfg)
    self.lora_config = rc.lora_config(cfg)
    # Kernels for the devices the step is compiled for (model.platform overrides), not the host's.
    self.platform = resolve_platform(cfg.model.platform, self.mesh)
    self.model = Llama(self.model_config, self.lora_config, platform=self.platform, mesh=self.mesh)
    self.total_steps = int(total_steps)
    mc, lora = self.model_config, self.lora_config
    self.base_shapes = param_shapes(mc)
    self.shapes = param_shapes(mc, lora) if lora else self.base_shapes
    if lora is not None:  # targets matching no module fail here, before any allocation
      from lora_jax.lora import target_kernel_paths
      try:
        target_kernel_paths(self.base_shapes, lora)
      except ValueError as e:
        raise rc.ConfigError("lora.targets", str(e)) from None
    self.labels = trainable_labels(self.shapes, lora,
                                   frozen_patterns=rc.frozen_patterns(cfg) if not lora else ())
    tr_shapes, fr_shapes = split_params(self.shapes, self.labels)
    if not jax.tree_util.tree_leaves(tr_shapes):
      raise rc.ConfigError("full_ft_frozen", "freezes every parameter; nothing would train")
    self.frozen_shapes = fr_shapes  # export rebuilds full trees from the LoRA leaves with them
    axes = param_logical_axes(mc, lora)
    self.param_sharding = sharding.tree_shardings(self.shapes, axes, self.mesh)
    self.base_sharding = sharding.tree_shardings(self.base_shapes, axes, self.mesh)
    tr_sh, self.frozen_sharding = split_params(self.param_sharding, self.labels)
    self.tx, self.lr_fn = make_optimizer(cfg.optimizer, cfg.schedule, self.total_steps)
    self.state_sharding = state_shardings(tr_sh, self.tx, tr_shapes, self.mesh)
    self.abstract_state = ckpt.abstract_like(
        jax.eval_shape(lambda t: TrainState.create(t, self.tx, jax.random.PRNGKey(0)), tr_shapes),
        self.state_sharding)
    dropout = bool((lora is not None and lora.dropout > 0) or mc.attention_dropout > 0)
    self.step_fn = make_train_step(
        self.model, self.tx, self.lr_fn, microbatches=cfg.train.microbatches, dropout=dropout,
        mesh=self.mesh, state_sharding=self.state_sharding, frozen_sharding=self.frozen_sharding)
    self.n_total = count_params(self.shapes)
    self.n_trainable = count_params(tr_shapes)
    self.checkpoint_bytes = tree_bytes(self.abstract_state)
    self.state: TrainState | None = None
    self.frozen: dict | None = None
    # Where the frozen base came from (preset / HF dir / given params, seed, overrides) and the
    # fingerprint of its weights: saved with every checkpoint, checked on resume.
    self.base_provenance: dict = {}

  # -- params
  def _keys(self):
    root = jax.random.PRNGKey(self.cfg.seed)
    return [jax.random.fold_in(root, i) for i in range(3)]  # base init, LoRA init, train RNG

  def _check_base(self, params, key: str):
    want = jax.tree.map(lambda s: tuple(s.shape), self.base_shapes)
    got = jax.tree.map(lambda x: tuple(np.shape(x)), dict(params))
    if want != got:
      raise rc.ConfigError(key, "params do not match the model config (model.preset / "
                                "model.overrides / model.hf_path): shapes or leaves differ")

  def _build(self, base, lora_key, rng, with_state: bool):
    """Traceable: base -> (TrainState or None, frozen, base checksums)."""
    sums = ckpt.fingerprint_sums(base)
    params = base
    if self.lora_config is not None:
      params = add_lora(base, self.lora_config, lora_key)
    trainable, frozen = split_params(params, self.labels)
    state = TrainState.create(trainable, self.tx, rng) if with_state else None
    return state, frozen, sums

  def init_state(self, base_params: Any = None, *, with_state: bool = True) -> None:
    """Fresh state from the frozen base (`base_params`, the HF dir, or the preset's seeded init)
    plus LoRA leaves (A random, B = 0): one jitted, sharded computation. `with_state=False`
    builds only the frozen part (a checkpoint restore supplies the rest)."""
    cfg, mc = self.cfg, self.model_config
    base_key, lora_key, rng = self._keys()
    rep = sharding.replicated(self.mesh)
    sums_sharding = jax.tree.map(lambda _: rep, self.base_shapes)
    out_shardings = (self.state_sharding if with_state else None, self.frozen_sharding,
                     sums_sharding)
    if base_params is None and not cfg.model.hf_path:
      source = "preset"
      build = lambda k, lk, r: self._build(init_params(mc, k), lk, r, with_state)  # noqa: E731
      self.state, self.frozen, sums = jax.jit(build, out_shardings=out_shardings)(
          base_key, lora_key, rng)
    else:
      if base_params is not None:
        source, key, host = "base_params", "base_params", base_params
      else:
        from lora_jax.interop.hf import load_hf
        source, key = "hf", "model.hf_path"
        try:
          _, host = load_hf(cfg.model.hf_path, dtype=mc.param_dtype)
        except (OSError, ValueError) as e:  # missing / truncated / mismatched weights
          raise rc.ConfigError(key, str(e)) from None
      self._check_base(host, key)
      host = jax.tree.map(lambda x: x.astype(jnp.dtype(mc.param_dtype)), host)
      base = sharding.put_tree(host, self.base_sharding)
      del host
      build = lambda b, lk, r: self._build(b, lk, r, with_state)  # noqa: E731
      self.state, self.frozen, sums = jax.jit(
          build, out_shardings=out_shardings, donate_argnums=0)(base, lora_key, rng)
    self.base_provenance = {
        "source": source, "preset": "" if cfg.model.hf_path else cfg.model.preset,
        "hf_path": fileio.abspath(cfg.model.hf_path) if cfg.model.hf_path else "",
        "overrides": dict(cfg.model.overrides.to_dict()), "seed": cfg.seed,
        "fingerprint": ckpt.fingerprint_from_sums(self.base_shapes, sums)}

  def params(self) -> dict:
    return combine_params(self.state.trainable, self.frozen)

  def put_batch(self, host_batch: dict) -> dict:
    return sharding.put_batch({k: host_batch[k] for k in BATCH_KEYS}, self.mesh,
                              self.cfg.train.global_batch)

  def step(self, host_batch: dict) -> dict:
    """One optimizer step on a process-local host batch; returns device metrics."""
    self.state, metrics = self.step_fn(self.state, self.frozen, self.put_batch(host_batch))
    return metrics


# --------------------------------------------------------------------------- data and length
def open_tokenizer(cfg, vocab_size: int | None = None):
  """The run's tokenizer; a missing / unreadable file, or a vocab larger than the model's
  (`vocab_size`), is a DataError naming data.tokenizer."""
  from lora_jax.data import DataError, check_vocab, load_tokenizer
  try:
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if vocab_size is not None:
      check_vocab(tokenizer, vocab_size)
  except DataError:
    raise
  except (OSError, ValueError) as e:
    msg = str(e).removeprefix("data.tokenizer: ")
    raise DataError("data.tokenizer", msg) from None
  return tokenizer


def open_data(cfg, model_config: LlamaConfig):
  """This process's batch iterator over the configured data."""
  from lora_jax.data import make_batch_iterator
  tokenizer = open_tokenizer(cfg, model_config.vocab_size)
  return make_batch_iterator(cfg.data, tokenizer, seq_len=cfg.train.seq_len,
                             batch_size=cfg.train.global_batch // jax.process_count(),
                             seed=cfg.seed, process_index=jax.process_index(),
                             process_count=jax.process_count())


def batches_per_epoch(cfg, data_iter) -> int | None:
  """Global batches in one pass over the data, when the run needs it and the data knows it."""
  needs = cfg.train.epochs > 0 or cfg.data.regime == "ift" or cfg.data.source == "synthetic"
  if not needs or not hasattr(data_iter, "batches_per_epoch"):
    return None
  return int(data_iter.batches_per_epoch)


def total_steps_for(cfg, batches_per_epoch: int | None) -> int:
  """train.steps, else train.epochs of the data, else train.token_budget in global batches."""
  train_cfg = cfg.train
  if train_cfg.steps:
    return int(train_cfg.steps)
  if train_cfg.epochs:
    if not batches_per_epoch:
      raise rc.ConfigError("train.epochs", "the data has no epoch length (an epoch smaller than "
                           "one global batch, or an unsized stream); use train.steps")
    return max(1, math.ceil(train_cfg.epochs * batches_per_epoch))
  return max(1, math.ceil(train_cfg.token_budget / (train_cfg.global_batch * train_cfg.seq_len)))
