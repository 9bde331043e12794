"""Shared by the data tests: the default `data` config section with some keys overridden."""

from __future__ import annotations

import ml_collections

from lora_jax.config import default_config


def data_cfg(**overrides) -> ml_collections.ConfigDict:
  c = default_config().data
  with c.unlocked():
    for k, v in overrides.items():
      c[k] = v
  return c
