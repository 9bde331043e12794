"""`lora-jax analyze`: spectra, rank@p and intruder dimensions of a finetuned model vs its base."""

from __future__ import annotations

import argparse
import os
import sys

from lora_jax.commands import argtypes
from lora_jax.fileio import is_remote

HELP = ("Spectral analysis of W_ft - W_base per layer and module (rank@p of the variance, effective "
        "rank, relative norm, optional intruder dimensions): spectra.npz, analysis.json, plots.")


# What `analyze` writes into --out (an --out holding other files needs --overwrite).
OWNED_FILES = ("spectra.npz", "analysis.json", "*.png")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--base", required=True, help="base model: HF directory or lora-jax checkpoint")
  p.add_argument("--finetuned", required=True,
                 help="finetuned model: HF directory, lora-jax checkpoint, or PEFT adapter directory")
  p.add_argument("--out", required=True, type=argtypes.output_dir, help="output directory (e.g. <run>/analysis)")
  argtypes.add_overwrite_flag(p)
  p.add_argument("--modules", default="all",
                 help="comma-separated modules (q_proj,...,down_proj) or attention / mlp / all")
  p.add_argument("--layers", default=None, type=argtypes.int_list, help="comma-separated layer indices (default: all)")
  p.add_argument("--variance", type=argtypes.probability, default=0.9,
                 help="fraction p of sum(s^2) for rank@p (default 0.9, as the paper)")
  p.add_argument("--intruders", action="store_true",
                 help="also count intruder dimensions (Shuttleworth et al. 2024)")
  p.add_argument("--intruder-k", type=argtypes.positive_int, default=10, help="top-k singular vectors examined")
  p.add_argument("--intruder-eps", type=float, default=0.5, help="cosine similarity threshold")
  p.add_argument("--layer-batch", type=int, default=0,
                 help="layers per vmapped SVD call (default: as many as fit in 256 MiB)")
  p.add_argument("--random-n", type=int, default=1000,
                 help="size of the random Gaussian baseline matrix (0: skip)")
  p.add_argument("--no-plots", action="store_true", help="write only spectra.npz + analysis.json")
  p.add_argument("--quiet", action="store_true", help="no progress bar")


def _summary_lines(result) -> list[str]:
  p = result.meta["variance"]
  head = f"{'module':<10} {'shape':>12} {'rank@' + format(p, '.0%') + ' dW':>13} " \
         f"{'(min-max)':>11} {'W_base':>8} {'|dW|/|W|':>9}"
  if result.meta.get("intruders"):
    head += f" {'intruders':>9}"
  lines = [head]
  for m, s in result.summary().items():
    line = (f"{m:<10} {'x'.join(map(str, s['shape'])):>12} {s['mean_rank_delta']:>13.1f} "
            f"{str(s['min_rank_delta']) + '-' + str(s['max_rank_delta']):>11} "
            f"{s['mean_rank_base']:>8.1f} {s['mean_rel_delta_norm']:>9.4f}")
    if "total_intruders" in s:
      line += f" {s['total_intruders']:>9d}"
    lines.append(line)
  return lines


def run(args: argparse.Namespace) -> int:
  from lora_jax import analysis

  try:
    argtypes.claim_output_dir(args.out, OWNED_FILES, args.overwrite)
    result = analysis.analyze(
        args.base, args.finetuned, modules=args.modules, layers=args.layers, variance=args.variance,
        intruders=args.intruders, intruder_k=args.intruder_k, intruder_eps=args.intruder_eps,
        layer_batch=args.layer_batch or None, progress=not args.quiet)
  except (ValueError, OSError, KeyError, RuntimeError) as e:
    print(f"lora-jax analyze: {e}", file=sys.stderr)
    return 2
  if args.random_n > 0:
    analysis.attach_random_baseline(result, n=args.random_n)
  paths = analysis.save_analysis(result, args.out)
  if not args.no_plots:
    from lora_jax.report.plots import plot_analysis
    paths.update(plot_analysis(result, args.out))
  print("\n".join(_summary_lines(result)))
  rb = result.meta.get("random_baseline")
  if rb:
    print(f"random {rb['shape'][0]}x{rb['shape'][1]} Gaussian: rank@{args.variance:.0%} = "
          f"{rb['rank_A']} (Marchenko-Pastur: {rb['mp_expected_rank']:.0f})")
  for name, path in paths.items():
    print(f"wrote {name}: {path if is_remote(path) else os.path.relpath(path)}")
  return 0
