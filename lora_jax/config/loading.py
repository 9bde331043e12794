"""Config files and `--config.key=value` overrides: the one loader and the one override parser.

A config file is a Python file defining `get_config(arg=None)` that returns a ConfigDict built
from `default_config()` (a sweep file also defines `get_sweep()`, see lora_jax.experiments.sweep).

    cfg = load_config("configs/tiny_lora.py", ["optimizer.lr=3e-4"])

Overrides are "key=value" or, as typed on the command line, "--config.key=value" /
"--config.key value"; the value text is converted to the type of the key's default.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import re
from types import ModuleType
from typing import Any, Iterable, Sequence

import ml_collections

from lora_jax.config.errors import ConfigError
from lora_jax.config.schema import check_model_override, check_schema, coerce, default_config

OVERRIDE_PREFIX = "--config."


# --------------------------------------------------------------------------- overrides
def split_overrides(words: Sequence[str]) -> tuple[list[str], list[str]]:
  """(["key=value", ...], the other words) from command-line words. "--config.key value" takes
  the next word as its value unless that word is an option ("--...")."""
  overrides, rest, i = [], [], 0
  while i < len(words):
    word = words[i]
    if word.startswith(OVERRIDE_PREFIX):
      body = word[len(OVERRIDE_PREFIX):]
      if "=" not in body and i + 1 < len(words) and not words[i + 1].startswith("--"):
        body = f"{body}={words[i + 1]}"
        i += 1
      overrides.append(body)
    else:
      rest.append(word)
    i += 1
  return overrides, rest


def parse_override(text: str) -> tuple[str, str]:
  """("key", "value text") from "key=value" or "--config.key=value"."""
  text = text[len(OVERRIDE_PREFIX):] if text.startswith(OVERRIDE_PREFIX) else text
  if "=" not in text:
    raise ConfigError(text, "override must look like key=value")
  key, value = text.split("=", 1)
  return key, value


def _parse_literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets `cfg[key] = text` converted to the existing value's type. `model.overrides.X` is free."""
  parts = key.split(".")
  if parts[:2] == ["model", "overrides"] and len(parts) == 3:
    check_model_override(parts[2], key)
    with cfg.model.overrides.unlocked():  # a config file may lock its ConfigDict
      cfg.model.overrides[parts[2]] = _parse_literal(text)
    return
  node = cfg
  for i, p in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      raise ConfigError(key, f"unknown config key (no {'.'.join(parts[:i + 1])!r} in the schema)")
    if i < len(parts) - 1:
      node = node[p]
  if isinstance(node[parts[-1]], ml_collections.ConfigDict):
    raise ConfigError(key, "is a section, not a value; set one of its keys")
  node[parts[-1]] = coerce(key, text, node[parts[-1]])


# --------------------------------------------------------------------------- files
def load_config(path: str | None, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Runs `get_config()` of the Python file at `path` (default schema if None), applies
  overrides ("a.b=value" or "--config.a.b=value") and checks keys and types (not values)."""
  cfg = default_config()
  if path:
    cfg = call_get_config(load_module(path))
    check_schema(cfg)
  for o in overrides:
    apply_override(cfg, *parse_override(o))
  return cfg


def load_module(path: str) -> ModuleType:
  """The config file at `path` as a module (not registered in sys.modules); whatever the file
  raises (a syntax error, a NameError, ...) becomes a ConfigError naming file:line."""
  if not os.path.isfile(path):
    raise ConfigError("config", f"no config file at {path!r}")
  name = "_lora_jax_config_" + re.sub(r"\W", "_", os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  with _file_errors(path):
    spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError("config", f"{path} defines no get_config()")
  return module


def call_get_config(module: ModuleType, arg: str | None = None) -> ml_collections.ConfigDict:
  """`module.get_config(arg)` (no argument when `arg` is None), checked to be a ConfigDict; an
  exception inside the file (e.g. a value of the wrong type refused by ConfigDict) becomes a
  ConfigError naming file:line."""
  path = module.__file__
  with _file_errors(path):
    cfg = module.get_config() if arg is None else module.get_config(arg)
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError("config", f"{path}: get_config() returned {type(cfg).__name__}, not a "
                      "ConfigDict (start from default_config())")
  return cfg


@contextlib.contextmanager
def _file_errors(path: str):
  """Any exception but a ConfigError raised inside the block becomes a ConfigError naming the
  line of `path` it came from (user code: any exception is a bad config file)."""
  try:
    yield
  except ConfigError:
    raise
  except SystemExit as e:  # a config file must not end the program silently
    raise ConfigError("config", f"{_line_in(path, e)}: the config file called sys.exit"
                      f"({e.code!r}); a config file must define get_config()") from None
  except Exception as e:  # noqa: BLE001
    raise ConfigError("config", f"{_line_in(path, e)}: {type(e).__name__}: {e}") from None


def _line_in(path: str, error: BaseException) -> str:
  """"path:line" of the innermost frame of `error` inside the file at `path` (or just path)."""
  target = os.path.abspath(path)
  if isinstance(error, SyntaxError) and error.filename and error.lineno:
    if os.path.abspath(error.filename) == target:
      return f"{path}:{error.lineno}"
  line = None
  tb = error.__traceback__
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == target:
      line = tb.tb_lineno
    tb = tb.tb_next
  return f"{path}:{line}" if line else path
