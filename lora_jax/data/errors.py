"""`DataError`: bad input data, with a location ("file:line", "file:row N", "data.path")."""

from __future__ import annotations


class DataError(ValueError):
  """Malformed or missing input data. `where` names the file and line (1-based) or config key."""

  def __init__(self, where: str, message: str):
    super().__init__(f"{where}: {message}")
    self.where = where
    self.message = message


def describe_type(value) -> str:
  return "null" if value is None else type(value).__name__
