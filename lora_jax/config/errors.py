"""`ConfigError`: a bad run configuration, naming the dotted config key at fault."""

from __future__ import annotations


class ConfigError(ValueError):
  """A bad run configuration; `key` is the dotted config key at fault."""

  def __init__(self, key: str, message: str):
    super().__init__(f"{key}: {message}")
    self.key = key


def require(cond: bool, key: str, message: str) -> None:
  """ConfigError(key, message) unless `cond`."""
  if not cond:
    raise ConfigError(key, message)
