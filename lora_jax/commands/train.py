"""`lora-jax train --config FILE [--config.key=value ...] [--force]`: train or resume a run."""

from __future__ import annotations

import argparse
import logging
import sys

HELP = "train (or resume) a LoRA / full-finetuning run from a config file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, metavar="FILE",
                      help="Python file with get_config() (see configs/)")
  parser.add_argument("--force", action="store_true",
                      help="resume even if the saved config or base model differs")
  parser.add_argument("--print-config", action="store_true",
                      help="print the resolved config and exit")
  parser.epilog = ("Override any config key with --config.<key>=<value>, e.g. "
                   "--config.optimizer.lr=3e-4 --config.train.steps=100.")
  collect_config_overrides(parser)


def collect_config_overrides(parser: argparse.ArgumentParser) -> None:
  """Makes `parser` gather `--config.<key>=<value>` (or `--config.<key> <value>`) words into
  `args.overrides`."""
  # argparse cannot declare the open-ended --config.<key> options: collect what this
  # subparser leaves unparsed into args.overrides (anything else is still an error).
  original = parser.parse_known_args

  def parse_known_args(args=None, namespace=None):
    from lora_jax.config import split_overrides
    namespace, extras = original(args, namespace)
    overrides, rest = split_overrides(extras)
    namespace.overrides = getattr(namespace, "overrides", None) or []
    namespace.overrides.extend(overrides)
    return namespace, rest

  parser.parse_known_args = parse_known_args


def run(args) -> int:
  from lora_jax import config as rc
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO chatter
  # basicConfig is a no-op when something (absl, via an earlier orbax import) configured the root
  # logger first; the run's own INFO lines ("resumed from ... at step N") must still show.
  logging.getLogger("lora_jax").setLevel(logging.INFO)
  try:
    cfg = rc.load_config(args.config, getattr(args, "overrides", []) or [])
    rc.validate_config(cfg)
  except rc.ConfigError as e:
    print(f"lora-jax train: config error: {e}", file=sys.stderr)
    return 2
  if args.print_config:
    print(cfg)
    return 0
  from lora_jax.data import DataError
  from lora_jax.training import TrainingError, train
  try:
    result = train(cfg, force=args.force)  # eval.* runs inside train(), as from Python
  except rc.ConfigError as e:
    print(f"lora-jax train: config error: {e}", file=sys.stderr)
    return 2
  except DataError as e:  # names file:line, or the data.* key
    print(f"lora-jax train: data error: {e}", file=sys.stderr)
    return 2
  except TrainingError as e:
    print(f"lora-jax train: {e}", file=sys.stderr)
    return 1
  if result.preempted:
    return result.exit_code
  last = next((m for m in reversed(result.metrics) if "loss" in m), {})
  print(f"done: step {result.step}, loss {last.get('loss', float('nan')):.4f}, "
        f"output {result.output_dir}" + "".join(f", {k}: {v}" for k, v in result.exports.items()))
  return 0
