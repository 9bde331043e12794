"""Sweeps: a config file's named groups of variants, expanded into training runs.

A config file (e.g. configs/paper/code_ift.py) defines `get_config(arg=None)`, where `arg` is a
variant string ("method=lora,rank=256,epochs=4"), and `get_sweep()` returning
{group name: [variant string, ...]}. Optionally `run_name(arg)` and `DEFAULT_GROUPS`.

`lora-jax train` loads `get_config()` with no argument, so a run is that command plus the
`--config.key=value` overrides that turn the default variant into the run's: `expand_sweep`
computes them as the difference between the two configs, which also checks every key against
the schema. Config files are loaded by `lora_jax.config.load_module`, as `lora-jax train` loads
them.

A file may define `describe(arg) -> dict` (steps, LR, schedule... shown by --dry-run),
`follow_ups(arg) -> [(lora-jax argv, output file)]` (run after the training run, e.g. its spectral
analysis; skipped once the output exists) and `branch_of(arg) -> (trunk variant, step) | None` (the
paper's CPT cooldown branches): when the trunk is among the planned runs, the branch runs after it
and, before its first start, gets a copy of the trunk's checkpoint at `step` as its own first
checkpoint (`seed_from_trunk`), so `lora-jax train` resumes it from there with its own schedule.
`run_sequentially` skips finished runs (an `export/` directory: it is written after the last step)
and resumes started ones.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Any, Callable, Iterable, Sequence

from lora_jax import config, fileio

TRAIN_PROGRAM = ("lora-jax", "train")


@dataclasses.dataclass(frozen=True)
class FollowUp:
  """A `lora-jax` command run after a training run (e.g. its spectral analysis); skipped when
  its `output` file exists."""
  argv: tuple[str, ...]  # subcommand and arguments, without the program
  output: str

  def command(self) -> str:
    return shlex.join(["lora-jax", *self.argv])


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
  start_from: str = ""  # another run's checkpoint (<output_dir>/checkpoints/<step>) to start from
  after: str = ""  # the run that writes `start_from` (planned earlier in the same sweep)
  plan: dict = dataclasses.field(default_factory=dict)  # the file's describe(variant), if any
  follow_ups: tuple[FollowUp, ...] = ()  # the file's follow_ups(variant), if any

  def argv(self, program: Sequence[str] = TRAIN_PROGRAM) -> list[str]:
    out = [*program, "--config", self.config_path]
    for key in sorted(self.overrides):
      out.append(f"{config.OVERRIDE_PREFIX}{key}={format_value(self.overrides[key])}")
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
    plan = module.describe(variant) if hasattr(module, "describe") else {}
    follow_ups = tuple(FollowUp(tuple(argv), output) for argv, output in
                       (module.follow_ups(variant) if hasattr(module, "follow_ups") else ()))
    run = PlannedRun(name=name, overrides=overrides, config_path=config_path, group=group,
                     variant=variant, plan=plan, follow_ups=follow_ups)
    if name in seen:
      if seen[name].overrides != overrides:
        raise ValueError(f"{config_path}: variants {seen[name].variant!r} and {variant!r} share "
                         f"the run name {name!r} but differ")
      continue
    seen[name] = run
    runs.append(run)
  return _link_branches(module, runs, seen)


def _link_branches(module, runs: list[PlannedRun],
                   by_name: dict[str, PlannedRun]) -> list[PlannedRun]:
  """Points each branch (`branch_of`) at its trunk's checkpoint when the trunk is planned, and
  orders every trunk before its branches."""
  branch_of = getattr(module, "branch_of", None)
  if branch_of is None:
    return runs
  linked = []
  for run in runs:
    got = branch_of(run.variant)
    trunk = by_name.get(_name(module, got[0], 0)) if got else None
    if trunk is not None:
      run = dataclasses.replace(
          run, after=trunk.name,
          start_from=f"{trunk.output_dir.rstrip('/')}/{CHECKPOINT_DIR}/{got[1]}")
    linked.append(run)
  position = {r.name: i for i, r in enumerate(linked)}
  return sorted(linked, key=lambda r: (position[r.after] + 0.5) if r.after else position[r.name])


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


CHECKPOINT_DIR = "checkpoints"  # lora_jax.checkpoint.CHECKPOINT_DIR (that module imports JAX)
EXPORT_DIR = "export"


def is_finished(run: PlannedRun) -> bool:
  """The run exported its model, which `lora-jax train` does only after the last step."""
  d = fileio.join(run.output_dir, EXPORT_DIR)
  return fileio.isdir(d) and bool(fileio.listdir(d))


def _has_checkpoints(output_dir: str) -> bool:
  """A complete step directory (on an object store: one holding orbax's commit marker)."""
  return bool(fileio.checkpoint_steps(fileio.join(output_dir, CHECKPOINT_DIR)))


def seed_from_trunk(run: PlannedRun) -> bool:
  """Before a branch's first start, its trunk checkpoint becomes its own first checkpoint
  (locally: hard links where the filesystem allows, else a copy, placed by one rename; on an
  object store, which has no rename: copied with orbax's commit marker last). False when there
  is nothing to do (not a branch, or the branch already has checkpoints: it resumes)."""
  if not run.start_from or _has_checkpoints(run.output_dir):
    return False
  src = run.start_from.rstrip("/")
  if not fileio.isdir(src):
    raise FileNotFoundError(f"run {run.name}: its trunk checkpoint {run.start_from} does not "
                            f"exist; run {run.after or 'the trunk'} first (it keeps that step)")
  dest = fileio.join(run.output_dir, CHECKPOINT_DIR, src.rsplit("/", 1)[-1])
  if fileio.is_remote(run.output_dir):
    fileio.rmtree(dest)  # an interrupted earlier copy
    fileio.copy_tree(src, dest, last=(fileio.ORBAX_COMMIT_MARKER,))
    return True
  tmp = f"{dest}.seeding"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.dirname(tmp), exist_ok=True)
  try:
    shutil.copytree(src, tmp, copy_function=os.link)
  except OSError:  # another filesystem, or no hard links
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
  os.rename(tmp, dest)
  return True


def _follow_ups(run: PlannedRun, call: Callable[[list[str]], int],
                log: Callable[[str], None]) -> int:
  """Runs the run's follow-up commands whose output is missing; the first failure's code."""
  for f in run.follow_ups:
    if fileio.exists(f.output):
      continue
    log(f"  {f.command()}")
    rc = call([sys.executable, "-m", "lora_jax.cli", *f.argv])
    if rc:
      log(f"{run.name}: {f.argv[0]} failed with exit code {rc}")
      return rc
  return 0


def run_sequentially(runs: Sequence[PlannedRun], *,
                     call: Callable[[list[str]], int] | None = None, keep_going: bool = False,
                     log: Callable[[str], None] = print) -> int:
  """Runs each training run in its own process, in order; 0 if all succeeded. Finished runs
  are skipped; a run that was preempted or killed resumes from its output_dir when the sweep is
  started again; a branch is seeded from its trunk's checkpoint before its first start."""
  call = call or subprocess.call
  failed = []
  for i, run in enumerate(runs, 1):
    if is_finished(run):
      log(f"[{i}/{len(runs)}] {run.name}: finished, skipped")
      if _follow_ups(run, call, log):
        failed.append(run.name)
      continue
    if run.after in failed:
      failed.append(run.name)
      log(f"[{i}/{len(runs)}] {run.name}: not started, its trunk {run.after} failed")
      continue
    log(f"[{i}/{len(runs)}] {run.name}")
    if seed_from_trunk(run):
      log(f"  starts from {run.start_from}")
    rc = call(run.argv(local_program()))
    if not rc:
      rc = _follow_ups(run, call, log)
    if rc:
      failed.append(run.name)
      log(f"run {run.name} failed with exit code {rc}")
      if not keep_going:
        break
  if failed:
    log(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    return 1
  return 0
