"""The objects a run config's sections build, one function each, raising `ConfigError` that
names the key at fault:

  model.*          model_config_from(cfg)  -> LlamaConfig (preset or HF config.json)
  lora.*           lora_config(cfg)        -> LoraConfig, or None for full finetuning
  full_ft_frozen   frozen_patterns(cfg)    -> regexes of param paths kept frozen
  train.keep_steps keep_steps(cfg)         -> sorted step numbers
  optimizer.*, schedule.*   lora_jax.optim.make_optimizer(cfg.optimizer, cfg.schedule, steps)
  mesh.*           lora_jax.sharding.make_mesh(cfg.mesh)  (and mesh_shape, the axis arithmetic)
"""

from __future__ import annotations

import json
import os
import re

import ml_collections

from lora_jax.config.errors import ConfigError, require
from lora_jax.config.model import LlamaConfig, preset


def model_config_from(cfg: ml_collections.ConfigDict) -> LlamaConfig:
  """LlamaConfig of the run: preset or HF config.json, + model.overrides and numerics."""
  m = cfg.model
  if m.hf_path:
    path = os.path.join(m.hf_path, "config.json")
    try:
      with open(path) as f:
        base = LlamaConfig.from_hf(json.load(f))
    except (OSError, ValueError, TypeError) as e:  # unreadable, not JSON, or missing keys
      raise ConfigError("model.hf_path", f"{path}: {e}") from None
  else:
    base = preset(m.preset)
  overrides = dict(m.overrides.to_dict() if hasattr(m.overrides, "to_dict") else m.overrides)
  try:
    return base.replace(**overrides, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                        attention_dropout=m.attention_dropout)
  except (TypeError, ValueError) as e:
    raise ConfigError("model.overrides", str(e)) from None


def lora_config(cfg: ml_collections.ConfigDict):
  """The run's `LoraConfig` (whose checks raise ConfigError naming lora.*), or None for full
  finetuning."""
  if not cfg.lora.enabled:
    return None
  from lora_jax.lora import LoraConfig  # imports jax; the config package does not
  return LoraConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha or None, dropout=cfg.lora.dropout,
                    targets=cfg.lora.targets, use_rslora=cfg.lora.use_rslora, init=cfg.lora.init)


def frozen_patterns(cfg: ml_collections.ConfigDict) -> list[str]:
  return _split(cfg.full_ft_frozen)


def keep_steps(cfg: ml_collections.ConfigDict) -> list[int]:
  """train.keep_steps as sorted ints; ConfigError naming the key if malformed."""
  out = []
  for word in _split(cfg.train.keep_steps):
    try:
      out.append(int(word))
    except ValueError:
      raise ConfigError("train.keep_steps", f"{word!r} is not a step number") from None
    require(out[-1] >= 1, "train.keep_steps", f"steps must be >= 1, got {out[-1]}")
  return sorted(set(out))


def _split(text: str) -> list[str]:
  return [p for p in re.split(r"[,\s]+", text or "") if p]
