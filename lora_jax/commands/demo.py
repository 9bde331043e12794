"""`lora-jax demo`: the paper's five claims on a tiny Llama, end to end, on CPU in minutes."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lora_jax.commands.argtypes import add_overwrite_flag, claim_output_dir

HELP = ("reproduce 'LoRA learns less and forgets less' on synthetic domains in minutes on CPU "
        "(no files, no network)")

# What the demo writes into --out (anything else there is foreign: refused without --overwrite).
OWNED = ("results.json", "report.md", "*.png", "base", "runs", "seed_*", "seeds.json",
         "seeds.md")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--out", default="demo_out", help="output directory (default: demo_out/)")
  p.add_argument("--seed", type=int, default=0, help="seed of data, tables and inits (default 0)")
  p.add_argument("--seeds", default=None,
                 help="comma list of seeds, e.g. 0,1: the demo once per seed (in --out/seed_N/) "
                      "and seeds.md / seeds.json with every metric as a range over the seeds and "
                      "each verdict's status per seed")
  p.add_argument("--quick", action="store_true",
                 help="a reduced run of every phase (<= 60 s, for CI); its verdict is "
                      "inconclusive by design")
  p.add_argument("--optimizer", choices=("adamw", "lionw"), default=None,
                 help="finetuning optimizer (default adamw; LionW wants ~3-10x smaller LRs, "
                      "so pass --lr-full / --lr-lora with it)")
  p.add_argument("--lr-full", default=None,
                 help="full-FT peak LR, or a comma list to select from by target validation "
                      "loss (default 3e-4,1e-3)")
  p.add_argument("--lr-lora", default=None,
                 help="LoRA peak LR, or a comma list (default 1e-3,3e-3)")
  p.add_argument("--steps", type=int, default=None, help="finetuning steps per run")
  p.add_argument("--ranks", default=None, help="LoRA ranks on all modules, e.g. 1,4,16,64")
  p.add_argument("--target-sets", default=None,
                 help="extra LoRA runs at the grid rank on these module sets, e.g. "
                      "attention,mlp (the paper's ablation; default none)")
  add_overwrite_flag(p)


def _tuple(text, kind):
  return tuple(kind(x) for x in text.split(",") if x) if text else None


def run(args: argparse.Namespace) -> int:
  from lora_jax.demo.pipeline import run_demo, settings_for
  from lora_jax.demo.verdict import summarize, verdict_lines
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  for name in ("lora_jax.training", "absl", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  try:
    claim_output_dir(args.out, OWNED, args.overwrite)
  except FileExistsError as e:
    print(f"lora-jax demo: {e}", file=sys.stderr)
    return 2
  ranks = _tuple(args.ranks, int)

  def make(seed):
    return settings_for(args.quick, seed=seed, optimizer=args.optimizer,
                        lrs_full=_tuple(args.lr_full, float),
                        lrs_lora=_tuple(args.lr_lora, float), finetune_steps=args.steps,
                        ranks=ranks, target_sets=_tuple(args.target_sets, str))

  echo = lambda m: print(m, flush=True)  # noqa: E731
  if args.seeds:
    from lora_jax.demo.seeds import run_seeds, summary_lines
    seeds = _tuple(args.seeds, int)
    print(f"lora-jax demo{' --quick' if args.quick else ''}: seeds {', '.join(map(str, seeds))}, "
          f"output in {os.path.abspath(args.out)}/", flush=True)
    summary = run_seeds(make, seeds, args.out, echo)
    print()
    for line in summary_lines(summary):
      print(line)
    print(f"\nsummary: {os.path.join(args.out, 'seeds.md')}")
    return 0
  settings = make(args.seed)
  print(f"lora-jax demo{' --quick' if settings.quick else ''}: seed {settings.seed}, "
        f"output in {os.path.abspath(args.out)}/", flush=True)
  results = run_demo(settings, args.out, echo=echo)
  t = results["timings"]["total"]
  print()
  print(f"Verdict ({summarize(results['verdict'])}"
        f"{'; quick mode: inconclusive by design' if settings.quick else ''}):")
  for line in verdict_lines(results["verdict"]):
    print("  " + line)
  print(f"\nreport: {os.path.join(args.out, 'report.md')}  results: "
        f"{os.path.join(args.out, 'results.json')}  ({t['wall_s']:.0f} s wall, "
        f"{t['cpu_s']:.0f} s CPU)")
  sys.stdout.flush()
  return 0
