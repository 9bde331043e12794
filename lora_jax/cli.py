"""`lora-jax` command line: thin wrappers over the library.

Each subcommand lives in `lora_jax/commands/<name>.py` and exposes `HELP` (one line),
`add_arguments(parser)` and `run(args) -> int`. Modules are imported lazily, so `lora-jax --help`
stays fast and a broken optional dependency only affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module under lora_jax.commands
COMMANDS = {
    "demo": "demo",
    "train": "train",
    "eval": "evaluate",
    "analyze": "analyze",
    "report": "report",
    "sweep": "sweep",
    "convert": "convert",
    "export-peft": "export_peft",
    "plan": "plan",
}


def _load(name: str):
  return importlib.import_module(f"lora_jax.commands.{COMMANDS[name]}")


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="lora-jax",
      description="LoRA Learns Less and Forgets Less, in JAX: train, evaluate, analyze, report.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name in COMMANDS:
    if argv_command is not None and name != argv_command:
      sub.add_parser(name, help="(see `lora-jax %s --help`)" % name)
      continue
    mod = _load(name)
    p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
    mod.add_arguments(p)
    p.set_defaults(_run=mod.run)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  command = argv[0] if argv and argv[0] in COMMANDS else None
  parser = build_parser(command)
  args = parser.parse_args(argv)
  if not getattr(args, "_run", None):
    parser.print_help()
    return 0 if not argv else 2
  return int(args._run(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
