"""Benchmark: how a lora-jax train step's cost grows with sequence length and with LoRA rank.

    python benchmarks/scaling.py                         # bench-34M, both sweeps, PNG + JSON
    python benchmarks/scaling.py --seqs 128,256 --ranks 1,16 --steps 2   # smoke run

Sequence sweep: L in --seqs with batch = --tokens // L (tokens per step held constant, so growth
above flat is attention's L^2 share), full finetuning and LoRA r=16. Rank sweep: LoRA on all
projections at rank in --ranks (batch 8 x seq 256), with full finetuning and the no-weight-
gradient floor (see train_step.py) as references. Within a sweep every contender is built and
warmed up first, then timed in turns (rotating order), median of --steps steps; wall and
process CPU time. Prints Markdown tables, writes JSON (--out) and a two-panel plot (--png).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _harness as H  # noqa: E402


def _contender(preset: str, mode: str, rank: int, batch: int, seq: int, warmup: int):
  import jax
  import numpy as np

  from lora_jax.metrics import train_flops_per_token
  from lora_jax.training import Trainer
  from train_step import _jax_config

  spec = {"preset": preset, "dtype": "float32", "rank": rank, "batch": batch, "seq": seq}
  t = Trainer(_jax_config(spec, mode), total_steps=1_000_000)
  t.init_state()
  tokens = np.random.default_rng(0).integers(3, t.model_config.vocab_size, (batch, seq))
  b = {"tokens": tokens.astype(np.int32),
       "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)),
       "segment_ids": np.ones((batch, seq), np.int32), "loss_mask": np.ones((batch, seq), np.int32)}

  def step():
    jax.block_until_ready(t.step(b))
  t0 = time.perf_counter()
  for _ in range(warmup):
    step()
  flops = batch * seq * train_flops_per_token(t.model_config, t.n_total, t.n_trainable, seq)
  return step, {"mode": mode, "rank": rank if mode == "lora" else None, "batch": batch,
                "seq": seq, "trainable_params": t.n_trainable, "flops_per_step": flops,
                "warmup_s": time.perf_counter() - t0}


def _sweep(contenders: dict, steps: int) -> dict:
  """Times the (name -> (step, meta)) contenders in rotating turns; medians per contender."""
  names = list(contenders)
  samples = {n: [] for n in names}
  for r in range(steps):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      samples[n].append(H.timed(contenders[n][0]))
    print(f"  round {r + 1}/{steps}", flush=True)
  out = {}
  for n in names:
    meta = contenders[n][1]
    wall = statistics.median(s["wall"] for s in samples[n])
    cpu = statistics.median(s["cpu"] for s in samples[n])
    tok = meta["batch"] * meta["seq"]
    out[n] = {**meta, "wall_s": wall, "cpu_s": cpu, "tokens_per_s": tok / wall,
              "tokens_per_cpu_s": tok / cpu, "samples": samples[n]}
  return out


def _plot(result: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  seq = result.get("seq_sweep", {})
  for mode, style in (("full", "o-"), ("lora", "s-")):
    rows = sorted((r for r in seq.values() if r["mode"] == mode), key=lambda r: r["seq"])
    if rows:
      ax1.plot([r["seq"] for r in rows], [r["cpu_s"] for r in rows], style,
               label=f"{'full FT' if mode == 'full' else 'LoRA r=16'}")
  ax1.set_xscale("log", base=2)
  ax1.set_xlabel("sequence length (batch x length = %d tokens)" % result["spec"]["tokens"])
  ax1.set_ylabel("CPU seconds per step")
  ax1.set_title("step cost vs sequence length")
  ax1.set_ylim(bottom=0)
  ax1.legend()
  ranks = result.get("rank_sweep", {})
  lora = sorted((r for r in ranks.values() if r["mode"] == "lora"), key=lambda r: r["rank"])
  if lora:
    ax2.plot([r["rank"] for r in lora], [r["cpu_s"] for r in lora], "s-", label="LoRA")
    for mode, ls in (("full", "--"), ("floor", ":")):
      ref = [r for r in ranks.values() if r["mode"] == mode]
      if ref:
        ax2.axhline(ref[0]["cpu_s"], ls=ls, color="gray",
                    label="full FT" if mode == "full" else "no weight gradients (floor)")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("LoRA rank (all 7 projections)")
    ax2.set_ylabel("CPU seconds per step")
    ax2.set_title(f"step cost vs LoRA rank (batch {result['spec']['rank_batch']} x "
                  f"{result['spec']['rank_seq']})")
    ax2.set_ylim(bottom=0)
    ax2.legend()
  fig.suptitle(f"lora-jax {result['spec']['preset']}, f32, {result['machine']['host_cpu']}, "
               f"{result['machine']['cpu_count']} CPUs", fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  os.replace(tmp, path)  # atomic: a failed run never leaves a half-written PNG


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="bench_34m")
  p.add_argument("--seqs", default="128,256,512,1024,2048")
  p.add_argument("--tokens", type=int, default=2048, help="tokens per step in the length sweep")
  p.add_argument("--ranks", default="1,4,16,64,256")
  p.add_argument("--steps", type=int, default=4, help="timed steps per contender")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--out", default="benchmarks/results/scaling.json")
  p.add_argument("--png", default="benchmarks/results/scaling.png")
  args = p.parse_args(argv)
  seqs = [int(s) for s in args.seqs.split(",") if s]
  ranks = [int(r) for r in args.ranks.split(",") if r]
  machine = H.machine_info()
  print(H.load_line(machine), flush=True)
  result = {"machine": machine, "spec": {"preset": args.preset, "tokens": args.tokens,
                                         "rank_batch": 8, "rank_seq": 256, "steps": args.steps}}
  lines = []
  if seqs:
    print("length sweep: building + compiling...", flush=True)
    cs = {}
    for L in seqs:
      for mode in ("full", "lora"):
        cs[f"{mode}_L{L}"] = _contender(args.preset, mode, 16, max(1, args.tokens // L), L,
                                        args.warmup)
    result["seq_sweep"] = _sweep(cs, args.steps)
    del cs
    lines += ["", f"## Step cost vs sequence length ({args.preset}, {args.tokens} tokens per "
              "step, f32)", "",
              "| seq | batch | full FT s/step (CPU-s) | LoRA r=16 s/step (CPU-s) | full / LoRA (CPU) |",
              "|---|---|---|---|---|"]
    sw = result["seq_sweep"]
    for L in seqs:
      f, lo = sw[f"full_L{L}"], sw[f"lora_L{L}"]
      lines.append(f"| {L} | {f['batch']} | {f['wall_s']:.2f} ({f['cpu_s']:.2f}) | "
                   f"{lo['wall_s']:.2f} ({lo['cpu_s']:.2f}) | {f['cpu_s'] / lo['cpu_s']:.2f}x |")
  if ranks:
    print("rank sweep: building + compiling...", flush=True)
    cs = {f"lora_r{r}": _contender(args.preset, "lora", r, 8, 256, args.warmup) for r in ranks}
    cs["full"] = _contender(args.preset, "full", 16, 8, 256, args.warmup)
    cs["floor"] = _contender(args.preset, "floor", 16, 8, 256, args.warmup)
    result["rank_sweep"] = _sweep(cs, args.steps)
    del cs
    rs = result["rank_sweep"]
    lines += ["", f"## Step cost vs LoRA rank ({args.preset}, batch 8 x seq 256, f32)", "",
              "| contender | trainable params | s/step (CPU-s) | full FT / this (CPU) |",
              "|---|---|---|---|"]
    for n, r in rs.items():
      lines.append(f"| {n} | {r['trainable_params'] / 1e6:.2f}M | {r['wall_s']:.2f} "
                   f"({r['cpu_s']:.2f}) | {rs['full']['cpu_s'] / r['cpu_s']:.2f}x |")
  H.finish(result, lines, args.out)
  try:
    _plot(result, args.png)
    print(f"wrote {args.png}")
  except ImportError as e:
    print(f"no plot ({e})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
