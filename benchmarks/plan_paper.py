"""Benchmark: the paper's runs planned for Cloud TPU (`lora-jax plan --auto`), no TPU needed.

    nice python benchmarks/plan_paper.py              # plan what is missing, then the table
    python benchmarks/plan_paper.py --table-only      # the table from the JSON written so far
    python benchmarks/plan_paper.py --only code_cpt/full

Each distinct run shape of configs/paper/* (code CPT, math CPT and code IFT share 192 x 4096;
math IFT is 768 x 1024) x {full FT, LoRA r=16, LoRA r=256} is planned on one slice per shape:
the smallest standard slice (fewest chips; among equal counts v5e, v6e, v4, v5p) on which the
analytic model fits full finetuning, so LoRA and full FT sit side by side. Only the train step
is compiled (`--programs train`): a 7B compile takes ~10 minutes on a quiet 2-core host.
Each plan is written to benchmarks/results/plan_paper/<shape>_<method>.json as it finishes
(a rerun skips those present), then the Markdown table is printed and written to
benchmarks/results/plan_paper.md. Every number is an estimate from the compiler (see
`lora-jax plan`), not a measurement on a TPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "benchmarks", "results", "plan_paper")
SHAPES = {  # shape name -> (config, regimes sharing its global batch x seq_len)
    "code_cpt": ("configs/paper/code_cpt.py", "code CPT, math CPT, code IFT: 192 x 4096"),
    "math_ift": ("configs/paper/math_ift.py", "math IFT: 768 x 1024"),
}
METHODS = {
    "full": ["--config.lora.enabled=False"],
    "lora_r16": ["--config.lora.enabled=True", "--config.lora.rank=16", "--config.lora.alpha=32"],
    "lora_r256": ["--config.lora.enabled=True", "--config.lora.rank=256",
                  "--config.lora.alpha=512"],
}
GiB = 1024**3


def smallest_slice(config: str) -> str:
  """The first standard slice on which the analytic model fits full finetuning."""
  from lora_jax import config as rc
  from lora_jax.plan import compile as pc
  from lora_jax.plan import memory_model as mm
  from lora_jax.plan import search, topologies
  cfg, _ = pc.without_weights(rc.load_config(config, METHODS["full"]))
  shapes = None
  for sl in topologies.standard_slices():
    tgt = search.target(sl.name)
    shapes = shapes or search._shapes(cfg, tgt)
    ranked = mm.rank(shapes, tgt.devices, tgt.hbm_bytes, global_batch=cfg.train.global_batch,
                     seq_len=cfg.train.seq_len, peak_flops=tgt.peak_flops,
                     ici_bytes_per_s=tgt.ici_bytes_per_s)
    if mm.fits(ranked[0][1], tgt.hbm_bytes):
      return sl.name
  raise SystemExit(f"{config}: full finetuning fits no standard slice up to 64 chips")


def command(config: str, slice_name: str, method: str, out: str) -> list[str]:
  return ["lora-jax", "plan", "--config", config, "--topology", slice_name, "--auto",
          "--programs", "train", "--json", out, *METHODS[method]]


def run_one(argv: list[str], log_path: str) -> int:
  with open(log_path, "w") as log:
    return subprocess.call(["nice", "-n", "10", *argv], stdout=log, stderr=subprocess.STDOUT,
                           cwd=ROOT)


def _row(shape: str, method: str, slice_name: str, r: dict | None, full: dict | None) -> str:
  if r is None:
    return f"| {shape} | {method} | {slice_name} | not yet run (command below) | | | | | | |"
  s, pd, e = r["setting"], r["per_device"], r["estimate"] or {}
  mesh = "/".join(str(v) for v in s["mesh"].values())
  state = sum(pd.get(k, 0) for k in ("frozen_base_bytes", "trainable_bytes", "optimizer_bytes"))
  total = f"{pd['peak_bytes'] / GiB:.1f}" if "peak_bytes" in pd else "-"
  fits = "yes" if r["fits"] else "NO"
  step = e.get("step_seconds")
  full_step = ((full or {}).get("estimate") or {}).get("step_seconds")
  vs_full = f"{step / full_step:.2f}x" if step and full_step and method != "full" else ""
  head = (f"| {shape} | {method} | {r['target']['name'].split(' ')[0]} | {s['remat']}, "
          f"{s['microbatches']}, {mesh} | {total} ({fits}) | {state / GiB:.1f} |")
  if not e:
    return head + " | | | |"
  return (head + f" {step:.2f} | {vs_full} | {e['mfu']:.0%} | "
          f"{e['tokens_per_s_per_chip']:,.0f} |")


def table(plans: dict) -> str:
  lines = ["| shape | method | slice | remat, microbatches, mesh data/fsdp/tensor | "
           "GiB per chip, train step (fits) | train state GiB per chip | step s | vs full FT | "
           "MFU | tokens/s per chip |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  missing = []
  for (shape, method), (slice_name, r, cmd) in plans.items():
    full = plans.get((shape, "full"), (None, None, None))[1]
    lines.append(_row(shape, method, slice_name, r, full))
    if r is None:
      missing.append(f"- {shape} / {method}: `{shlex.join(cmd)}`")
  if missing:
    lines += ["", "Not yet run (a 7B compile takes ~10 min of one core; run with `nice`):", *missing]
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--table-only", action="store_true", help="only print the table")
  ap.add_argument("--only", action="append", default=[], metavar="SHAPE/METHOD",
                  help="plan only these (repeatable), e.g. code_cpt/full")
  ap.add_argument("--slice", default="", help="plan on this slice instead of the smallest")
  args = ap.parse_args(argv)
  os.makedirs(OUT, exist_ok=True)
  plans = {}
  for shape, (config, _) in SHAPES.items():
    slice_path = os.path.join(OUT, f"{shape}_slice.txt")
    if args.slice:
      slice_name = args.slice
    elif os.path.exists(slice_path):
      slice_name = open(slice_path).read().strip()
    else:
      slice_name = smallest_slice(config)
      with open(slice_path, "w") as f:
        f.write(slice_name + "\n")
    for method in METHODS:
      out = os.path.join(OUT, f"{shape}_{method}.json")
      cmd = command(config, slice_name, method, os.path.relpath(out, ROOT))
      wanted = not args.only or f"{shape}/{method}" in args.only
      if wanted and not args.table_only and not os.path.exists(out):
        print(f"planning {shape}/{method} on {slice_name}: {shlex.join(cmd)}", flush=True)
        rc = run_one(cmd, out[:-len(".json")] + ".log")
        print(f"  exit {rc}", flush=True)
      r = json.load(open(out)) if os.path.exists(out) else None
      plans[(shape, method)] = (slice_name, r, cmd)
  text = table(plans)
  print(text)
  tmp = os.path.join(ROOT, "benchmarks", "results", "plan_paper.md.tmp")
  with open(tmp, "w") as f:
    f.write(text + "\n")
  os.replace(tmp, tmp[:-len(".tmp")])
  return 0


if __name__ == "__main__":
  sys.exit(main())
