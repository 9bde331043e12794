"""`lora-jax report`: a Markdown report with the paper's figures from run directories."""

from __future__ import annotations

import argparse
import sys

from lora_jax.commands import argtypes

HELP = ("Markdown report with PNG figures from run directories: learning curves, learning vs "
        "forgetting (Pareto), rank of dW by layer, spectra vs a random baseline, intruders.")


# What `report` writes into --out (an --out holding other files needs --overwrite).
OWNED_FILES = ("report.md", "report.json", "figures", "*.png")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--runs", nargs="+", required=True, metavar="DIR",
                 help="run directories (metrics.jsonl, evals/*.json, run.json/config.json, analysis/)")
  p.add_argument("--out", required=True, type=argtypes.output_dir,
                 help="output directory for report.md and figures/")
  argtypes.add_overwrite_flag(p)
  p.add_argument("--target", default=None,
                 help="learning task for the Pareto plot (default: most evaluated non-forgetting task)")
  p.add_argument("--x", default="auto", choices=("auto", "tokens", "epochs", "step"),
                 help="x axis of learning curves (auto: epochs when every run did >= 1)")
  p.add_argument("--title", default="LoRA Learns Less and Forgets Less: report")
  p.add_argument("--module", default=None, help="module whose spectra are plotted (default: first)")
  p.add_argument("--random-n", type=int, default=1000,
                 help="random baseline size when no analysis carries one")
  p.add_argument("--no-paper", dest="paper", action="store_false",
                 help="leave out the paper's figures 1-7 / S9, reference series and comparison")


def run(args: argparse.Namespace) -> int:
  from lora_jax.report import write_report

  try:
    argtypes.claim_output_dir(args.out, OWNED_FILES, args.overwrite)
    out = write_report(args.runs, args.out, target=args.target, x_axis=args.x, title=args.title,
                       random_n=args.random_n, module=args.module, paper=args.paper)
  except (ValueError, OSError) as e:
    print(f"lora-jax report: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out['report']} with {len(out['figures'])} figures")
  return 0
