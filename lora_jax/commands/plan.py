"""`lora-jax plan --config FILE --topology v5e-8 [--config.key=value ...] [--auto] [--json OUT]`:
compile the run's train step, eval forward and generation steps for a TPU slice (or `cpu`)
without devices, and report memory per device, whether it fits, and a roofline estimate."""

from __future__ import annotations

import argparse
import sys

from lora_jax.commands.train import collect_config_overrides
from lora_jax.fileio import atomic_write_json

HELP = "plan a run for a TPU slice without one: memory per chip, fits or not, estimated speed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, metavar="FILE",
                      help="Python file with get_config() (see configs/)")
  parser.add_argument("--topology", required=True,
                      help="TPU slice (v5e-8, v5p-16, v4-32, v6e-8, or a libtpu topology such "
                           "as v5e:2x4) or cpu (this host)")
  parser.add_argument("--auto", action="store_true",
                      help="search remat policy, microbatches and the data/fsdp/tensor split "
                           "for the fastest setting that fits, and print its overrides")
  parser.add_argument("--programs", default="train,eval,prefill,decode",
                      help="programs to compile (comma-separated; default: all four)")
  parser.add_argument("--generation", default="", metavar="BATCH,PROMPT,NEW",
                      help="generation shapes for prefill/decode (default: one row per "
                           "data-parallel device, 512-token prompt, 512 new tokens)")
  parser.add_argument("--json", default="", metavar="OUT", help="also write the plan as JSON")
  parser.epilog = "Override any config key with --config.<key>=<value>, as for train."
  collect_config_overrides(parser)


def _tuple(text: str, flag: str, n: int | None = None) -> tuple:
  parts = tuple(p.strip() for p in text.split(",") if p.strip())
  if n is not None:
    try:
      parts = tuple(int(p) for p in parts)
    except ValueError:
      parts = ()
    if len(parts) != n:
      raise SystemExit(f"lora-jax plan: {flag} wants {n} comma-separated integers, got {text!r}")
  return parts


def run(args) -> int:
  from lora_jax import config as rc
  from lora_jax.plan import PROGRAMS, LibtpuMissing, format_text, plan
  programs = _tuple(args.programs, "--programs")
  unknown = sorted(set(programs) - set(PROGRAMS))
  if unknown or not programs:
    print(f"lora-jax plan: --programs: unknown {unknown}; choose from {PROGRAMS}",
          file=sys.stderr)
    return 2
  generation = _tuple(args.generation, "--generation", 3) if args.generation else None
  try:
    cfg = rc.load_config(args.config, args.overrides)
    report = plan(cfg, args.topology, auto=args.auto, programs=programs, generation=generation)
  except rc.ConfigError as e:
    print(f"lora-jax plan: config error: {e}", file=sys.stderr)
    return 2
  except (ValueError, LibtpuMissing) as e:  # unknown slice, libtpu not installed
    print(f"lora-jax plan: {e}", file=sys.stderr)
    return 2
  print(format_text(report))
  if args.json:
    atomic_write_json(args.json, report)
  return 0 if report["fits"] else 1
