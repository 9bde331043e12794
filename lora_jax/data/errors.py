"""`DataError`: bad input data, with a location ("file:line", "file:row N", "data.path")."""

from __future__ import annotations

import json
import re


class DataError(ValueError):
  """Malformed or missing input data. `where` names the file and line (1-based) or config key."""

  def __init__(self, where: str, message: str):
    super().__init__(f"{where}: {message}")
    self.where = where
    self.message = message


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def lone_surrogate(json_text: str, obj) -> str | None:
  """A message if the JSON `obj` parsed from `json_text` holds a lone UTF-16 surrogate (e.g.
  "\\ud800"): valid JSON, but not text any tokenizer or UTF-8 writer accepts. Valid UTF-8 input
  can only carry one as a \\u escape, so most texts are cleared by one regex search."""
  if not _SURROGATE_ESCAPE.search(json_text):
    return None
  try:
    json.dumps(obj, ensure_ascii=False).encode("utf-8")
  except UnicodeEncodeError as e:
    bad = e.object[e.start:e.end].encode("utf-8", "backslashreplace").decode("ascii")
    return f"a string holds a lone surrogate ({bad}), which is not valid Unicode text"
  return None


def describe_type(value) -> str:
  return "null" if value is None else type(value).__name__
