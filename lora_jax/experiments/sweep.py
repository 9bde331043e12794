"""Sweeps: a config file's named groups of variants, expanded into training runs.

A config file (e.g. configs/paper/code_ift.py) defines `get_config(arg=None)`, where `arg` is a
variant string ("method=lora,rank=256,epochs=4"), and `get_sweep()` returning
{group name: [variant string, ...]}. Optionally `run_name(arg)` and `DEFAULT_GROUPS`.

`lora-jax train` loads `get_config()` with no argument, so a run is that command plus the
`--config.key=value` overrides that turn the default variant into the run's: `expand_sweep`
computes them as the difference between the two configs, which also checks every key against
the schema. Nothing here imports JAX.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Callable, Iterable, Sequence

from lora_jax import config

TRAIN_PROGRAM = ("lora-jax", "train")


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  """One training run still to launch: its name and the overrides on top of the config file's
  default (`output_dir` is always among them). A finished run, read back from its directory, is
  `lora_jax.report.Run`."""
  name: str
  overrides: dict[str, Any]
  config_path: str = ""
  group: str = ""
  variant: str = ""

  def argv(self, program: Sequence[str] = TRAIN_PROGRAM) -> list[str]:
    out = [*program, "--config", self.config_path]
    for key in sorted(self.overrides):
      out.append(f"--config.{key}={format_value(self.overrides[key])}")
    return out

  def command(self, program: Sequence[str] = TRAIN_PROGRAM) -> str:
    return shlex.join(self.argv(program))

  @property
  def output_dir(self) -> str:
    return self.overrides["output_dir"]


def format_value(value: Any) -> str:
  """Text that `lora_jax.config.apply_override` reads back as `value`."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  return str(value)


# ------------------------------------------------------------------------------ sweep files
def sweep_groups(module) -> dict[str, list[str]]:
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{module.__file__} defines no get_sweep(); it has no sweep")
  groups = module.get_sweep()
  if not isinstance(groups, dict) or not all(isinstance(v, list) for v in groups.values()):
    raise ValueError(f"{module.__file__}: get_sweep() must return {{group: [variant, ...]}}")
  return groups


def default_groups(module) -> tuple[str, ...]:
  return tuple(getattr(module, "DEFAULT_GROUPS", ("main",)))


# ------------------------------------------------------------------------------ variants
def parse_params(text: str | Iterable[str] | None) -> dict[str, str]:
  """"a=1,b=x" (or a list of such strings) -> {"a": "1", "b": "x"}, in order."""
  if text is None:
    return {}
  items = [text] if isinstance(text, str) else list(text)
  out: dict[str, str] = {}
  for chunk in items:
    for item in chunk.split(","):
      item = item.strip()
      if not item:
        continue
      if "=" not in item:
        raise ValueError(f"{item!r} is not key=value")
      key, value = item.split("=", 1)
      out[key.strip()] = value.strip()
  return out


def merge_variant(variant: str, params: dict[str, str]) -> str:
  """`variant` with `params` set on top (params win)."""
  merged = {**parse_params(variant), **params}
  return ",".join(f"{k}={v}" for k, v in merged.items())


def config_overrides(base, cfg) -> dict[str, Any]:
  """{dotted key: value} that turns config `base` into `cfg`; keys must exist in the schema."""
  fb, fc = config.flatten(base), config.flatten(cfg)
  unknown = sorted(set(fc) - set(fb))
  if unknown:
    raise config.ConfigError(unknown[0], "unknown config key (not in the base config)")
  out: dict[str, Any] = {}
  for key, value in fc.items():
    if key == "model.overrides":
      for name, v in value.items():
        if fb[key].get(name) != v:
          out[f"{key}.{name}"] = v
      continue
    if fb[key] != value:
      out[key] = value
  return out


def _name(module, variant: str, index: int) -> str:
  if hasattr(module, "run_name"):
    return module.run_name(variant)
  stem = os.path.splitext(os.path.basename(module.__file__))[0]
  slug = re.sub(r"[^A-Za-z0-9.]+", "-", variant).strip("-")
  return f"{stem}-{slug}" if slug else f"{stem}-{index}"


def expand_sweep(config_path: str, groups: Iterable[str] | None = None, *,
                 variants: Iterable[str] | None = None, params: dict[str, str] | None = None,
                 match: str | None = None, extra: Iterable[str] = ()) -> list[PlannedRun]:
  """The runs of `groups` (default: the file's DEFAULT_GROUPS, else "main") of the sweep in
  `config_path`, or of the explicit `variants`. `params` are variant keys set on every run
  (e.g. {"data_root": "gs://b/data"}); runs that become identical collapse into one. `match` is
  a regex on run names. `extra` are raw "key=value" config overrides added to every run (e.g.
  "train.microbatches=4"), checked against the schema."""
  module = config.load_module(config_path)
  extra = _check_extra(extra)
  params = dict(params or {})
  if variants is not None:
    todo = [("variant", v) for v in variants]
  else:
    available = sweep_groups(module)
    names = list(groups) if groups else list(default_groups(module))
    for g in names:
      if g not in available:
        raise ValueError(f"{config_path}: no sweep group {g!r}; groups: {sorted(available)}")
    todo = [(g, v) for g in names for v in available[g]]
  base = config.call_get_config(module)
  pattern = re.compile(match) if match else None
  runs: list[PlannedRun] = []
  seen: dict[str, PlannedRun] = {}
  for i, (group, variant) in enumerate(todo):
    variant = merge_variant(variant, params)
    name = _name(module, variant, i)
    if pattern and not pattern.search(name):
      continue
    cfg = config.call_get_config(module, variant)
    overrides = config_overrides(base, cfg)
    overrides["output_dir"] = cfg.output_dir  # always explicit: launchers and logs read it
    overrides.update(extra)
    run = PlannedRun(name=name, overrides=overrides, config_path=config_path, group=group,
              variant=variant)
    if name in seen:
      if seen[name].overrides != overrides:
        raise ValueError(f"{config_path}: variants {seen[name].variant!r} and {variant!r} share "
                         f"the run name {name!r} but differ")
      continue
    seen[name] = run
    runs.append(run)
  return runs


def _check_extra(extra: Iterable[str]) -> dict[str, str]:
  """{key: value text} of raw overrides, each checked against the schema (key and type)."""
  out: dict[str, str] = {}
  probe = config.default_config()
  for item in extra:
    key, text = config.parse_override(item)
    config.apply_override(probe, key, text)
    out[key] = text
  return out


def validate_runs(runs: Iterable[PlannedRun], **validate_kwargs) -> None:
  """Loads each run exactly as `lora-jax train` would and validates it (ConfigError names the
  run and key)."""
  for run in runs:
    overrides = [f"{k}={format_value(v)}" for k, v in run.overrides.items()]
    cfg = config.load_config(run.config_path, overrides)
    try:
      config.validate_config(cfg, **validate_kwargs)
    except config.ConfigError as e:
      raise config.ConfigError(e.key, f"run {run.name}: {e}") from None


# ------------------------------------------------------------------------------ running
def local_program() -> list[str]:
  """How this machine runs the training CLI (the same Python as the caller)."""
  return [sys.executable, "-m", "lora_jax.cli", "train"]


def run_sequentially(runs: Sequence[PlannedRun], *,
                     call: Callable[[list[str]], int] | None = None, keep_going: bool = False,
                     log: Callable[[str], None] = print) -> int:
  """Runs each training run in its own process, in order; 0 if all succeeded. A run that was
  preempted or killed resumes from its output_dir when the sweep is started again."""
  call = call or subprocess.call
  failed = []
  for i, run in enumerate(runs, 1):
    log(f"[{i}/{len(runs)}] {run.name}")
    rc = call(run.argv(local_program()))
    if rc:
      failed.append(run.name)
      log(f"run {run.name} failed with exit code {rc}")
      if not keep_going:
        break
  if failed:
    log(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    return 1
  return 0
