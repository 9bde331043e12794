"""`lora-jax sweep`: list (--dry-run) or run, one after another, the runs of a config's sweep."""

from __future__ import annotations

import argparse
import json
import sys

HELP = ("Expand a config file's sweep (get_sweep(): methods x ranks x targets x LRs x budgets) "
        "into `lora-jax train` runs; list them with --dry-run or run them in order.")

LAUNCH_HINT = (
    "These runs need accelerators. On Cloud TPU, run a sweep on one slice with\n"
    "  python launch/tpu.py up --name NAME --accelerator-type v5p-64 --zone us-east5-a \\\n"
    "      --bucket gs://BUCKET --sweep {config} [--groups ...]\n"
    "and on a GPU VM with launch/gpu.py (see launch/README.md).")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", required=True, help="config file with get_config() and get_sweep()")
  p.add_argument("--groups", default="",
                 help="comma-separated sweep groups (default: the file's DEFAULT_GROUPS or main)")
  p.add_argument("--variant", action="append", default=None, metavar="K=V,...",
                 help="run exactly this get_config variant instead of groups (repeatable)")
  p.add_argument("--set", action="append", default=[], metavar="K=V,...", dest="set_params",
                 help="variant keys set on every run, e.g. data_root=gs://b/data,out=gs://b/runs")
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                 help="raw config override for every run, e.g. train.microbatches=4 (repeatable)")
  p.add_argument("--filter", default=None, metavar="REGEX", help="keep runs whose name matches")
  p.add_argument("--dry-run", action="store_true", help="list runs and commands; run nothing")
  p.add_argument("--json", action="store_true",
                 help="with --dry-run: one JSON object per run (name, group, argv, output_dir)")
  p.add_argument("--list-groups", action="store_true", help="list the sweep groups and sizes")
  p.add_argument("--keep-going", action="store_true", help="continue after a failed run")


def run(args: argparse.Namespace) -> int:
  from lora_jax import config
  from lora_jax.experiments import sweep

  try:
    if args.list_groups:
      module = config.load_module(args.config)
      defaults = sweep.default_groups(module)
      for name, variants in sweep.sweep_groups(module).items():
        mark = " (default)" if name in defaults else ""
        print(f"{name}: {len(variants)} variants{mark}")
      return 0
    groups = [g for g in args.groups.split(",") if g] or None
    runs = sweep.expand_sweep(args.config, groups, variants=args.variant,
                              params=sweep.parse_params(args.set_params), match=args.filter,
                              extra=args.override)
  except (ValueError, FileNotFoundError) as e:
    print(f"lora-jax sweep: {e}", file=sys.stderr)
    return 2
  if not runs:
    print("lora-jax sweep: no runs (check --groups / --filter)", file=sys.stderr)
    return 2
  if args.dry_run:
    for r in runs:
      if args.json:
        print(json.dumps({"name": r.name, "group": r.group, "variant": r.variant,
                          "output_dir": r.output_dir, "start_from": r.start_from or None,
                          "plan": r.plan, "argv": r.argv(),
                          "follow_ups": [["lora-jax", *f.argv] for f in r.follow_ups]}))
      else:
        start = f", starts from {r.start_from}" if r.start_from else ""
        print(f"# {r.name} [{r.group}{start}]")
        if r.plan:
          print("#   " + ", ".join(f"{k} {_plan_value(v)}" for k, v in r.plan.items()))
        for f in r.follow_ups:
          print(f"#   then: {f.command()}")
        print(r.command())
    if not args.json:
      print(f"# {len(runs)} runs", file=sys.stderr)
    return 0
  if _cpu_only():
    print(LAUNCH_HINT.format(config=args.config), file=sys.stderr)
  return sweep.run_sequentially(runs, keep_going=args.keep_going)


def _plan_value(v) -> str:
  if isinstance(v, dict):
    return "(" + ", ".join(f"{k}={_plan_value(x)}" for k, x in v.items()) + ")"
  return f"{v:g}" if isinstance(v, float) else str(v)


def _cpu_only() -> bool:
  try:
    import jax
    return jax.default_backend() == "cpu"
  except Exception:  # noqa: BLE001 - a hint only
    return False
