"""argparse `type=` validators shared by the subcommands.

A bad value is rejected while the command line is parsed, before any model or data is loaded, as
one line `lora-jax CMD: error: argument --flag: ...` with exit code 2 (argparse's own convention).
"""

from __future__ import annotations

import argparse
import os


def _number(text: str, cast, ok, expected: str):
  """`cast(text)` if it parses and satisfies `ok`, else one ArgumentTypeError saying `expected`."""
  try:
    value = cast(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
  if not ok(value):
    raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
  return value


def positive_int(text: str) -> int:
  """An integer >= 1 (a count: --limit, --workers, --batch-size ...)."""
  return _number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_float(text: str) -> float:
  """A number >= 0 (nan is rejected: it compares false)."""
  return _number(text, float, lambda v: v >= 0, "a number >= 0")


def probability(text: str) -> float:
  """A number in (0, 1] (top-p, a variance fraction)."""
  return _number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def int_list(text: str) -> list[int] | None:
  """'0,3,5' -> [0, 3, 5]; '' -> None (all). Every item a non-negative integer."""
  items = [s.strip() for s in text.split(",") if s.strip()]
  bad = [s for s in items if not s.isdigit()]
  if bad:
    raise argparse.ArgumentTypeError(
        f"expected comma-separated non-negative integers, got {', '.join(map(repr, bad))}")
  return [int(s) for s in items] or None


def existing_dir(text: str) -> str:
  """A directory that exists (an input root such as --data-dir); a gs:// URL is checked by the
  filesystem layer when it is opened, not while the command line is parsed."""
  from lora_jax.fileio import is_remote
  if is_remote(text):
    return text
  path = os.path.expanduser(text)
  if not os.path.exists(path):
    raise argparse.ArgumentTypeError(f"{text}: no such directory")
  if not os.path.isdir(path):
    raise argparse.ArgumentTypeError(f"{text}: not a directory")
  return path


def add_overwrite_flag(p: argparse.ArgumentParser) -> None:
  p.add_argument("--overwrite", action="store_true",
                 help="write into an --out that holds other files (they are kept; only this "
                      "command's own files are replaced)")


def claim_output_dir(path: str, owned: tuple[str, ...], overwrite: bool) -> None:
  """Refuses (FileExistsError) an existing `path` holding files this command does not write,
  unless `overwrite`; call it before any work. The command never deletes what it did not write.
  Local and gs:// alike."""
  from lora_jax.fileio import check_replaceable
  check_replaceable(path, owned, overwrite)


def output_dir(text: str) -> str:
  """An output directory: it may exist as a directory, never as a file (checked before any work)."""
  if not text.strip():
    raise argparse.ArgumentTypeError("expected a directory path, got an empty string")
  from lora_jax.fileio import is_remote
  if is_remote(text):
    return text
  path = os.path.expanduser(text)
  if os.path.lexists(path) and not os.path.isdir(path):
    raise argparse.ArgumentTypeError(f"{text}: exists and is not a directory")
  return path
