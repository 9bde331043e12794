"""The demo's outputs: results.json, report.md and its PNGs (with `lora_jax.report.plots`)."""

from __future__ import annotations

import os

import numpy as np

from lora_jax.demo.verdict import verdict_lines
from lora_jax.fileio import atomic_write_json, atomic_write_text
from lora_jax.report import plots

FIGURES = {
    "pareto": "pareto.png",
    "learning": "learning_curves.png",
    "forgetting": "forgetting_curves.png",
    "rank": "rank_by_layer.png",
    "spectra": "spectra.png",
}


def write_results(results: dict, out_dir: str) -> str:
  path = os.path.join(out_dir, "results.json")
  atomic_write_json(path, results, indent=1)
  return path


def plot_label(run: dict) -> str:
  return f"{run['label']}, lr {run['lr']:g}" + ("" if run.get("selected", True) else " (not kept)")


def write_figures(results: dict, spectra: dict[str, dict[str, np.ndarray]], out_dir: str) -> dict:
  """PNGs of the learning-vs-forgetting plane, curves, full-FT dW rank by layer and spectra."""
  runs = results["runs"]
  kept = [r for r in runs if r.get("selected", True)]
  paths = {}
  base = results["base"]
  paths["pareto"] = plots.plot_pareto(
      {plot_label(r): [(p["source_acc"], p["target_acc"], p["step"] or None) for p in r["curve"]]
       for r in runs},
      os.path.join(out_dir, FIGURES["pareto"]),
      xlabel="source accuracy (forgetting: lower = more forgotten)",
      ylabel="target accuracy (learning)",
      title="Learning vs forgetting (checkpoints in training order; * = end)",
      base_point=(base["source_acc"], base["target_acc"]))
  paths["learning"] = plots.plot_learning_curves(
      {plot_label(r): ([p["step"] for p in r["curve"]], [p["target_acc"] for p in r["curve"]])
       for r in runs},
      os.path.join(out_dir, FIGURES["learning"]), xlabel="finetuning step",
      ylabel="target accuracy (greedy exact match)", title="Learning: target domain")
  paths["forgetting"] = plots.plot_learning_curves(
      {plot_label(r): ([p["step"] for p in r["curve"]], [p["source_acc"] for p in r["curve"]])
       for r in runs},
      os.path.join(out_dir, FIGURES["forgetting"]), xlabel="finetuning step",
      ylabel="source accuracy (4-way multiple choice)", title="Forgetting: source domain")
  full = next((r for r in kept if r["rank"] == 0), None)
  lora_ranks = sorted({r["rank"] for r in kept if r["rank"] > 0})
  if full is not None and full.get("rank_by_layer"):
    paths["rank"] = plots.plot_rank_by_layer(
        {m: tuple(v) for m, v in full["rank_by_layer"].items()},
        os.path.join(out_dir, FIGURES["rank"]),
        title="Full FT: rank needed to explain 90% of the variance of ΔW",
        reference_ranks=lora_ranks, max_rank=results["hidden_size"])
  if spectra:
    paths["spectra"] = plots.plot_spectra(
        spectra, os.path.join(out_dir, FIGURES["spectra"]),
        title=f"Spectra at layer {results.get('spectra_layer', '?')} "
              f"({results.get('spectra_module', '')})")
  return {k: os.path.basename(v) for k, v in paths.items() if v}


def _row(r: dict) -> str:
  end = r["curve"][-1]
  peak = max(p["target_acc"] for p in r["curve"])
  dr = r.get("delta_rank") or {}
  rank = f"{dr['median']:g} / {dr['max']}" if dr else "-"
  t = r.get("time", {})
  kept = "" if r.get("selected", True) else " (LR not kept)"
  return (f"| {r['label']}{kept} | {r['lr']:g} | {end['target_loss']:.3f} | "
          f"{end['target_acc']:.3f} | {peak:.3f} | {end['source_acc']:.3f} | {rank} | "
          f"{t.get('wall_s', 0):.0f} / {t.get('cpu_s', 0):.0f} |")


def write_markdown(results: dict, figures: dict, out_dir: str) -> str:
  s = results["settings"]
  base = results["base"]
  lines = [
      "# lora-jax demo: LoRA learns less and forgets less",
      "",
      f"Seed {s['seed']}{' (quick mode: a reduced run, not evidence)' if s['quick'] else ''}. "
      "Everything was generated in-process; numbers are measured, not assumed.",
      "",
      "## Verdict",
      "",
  ]
  lines += [f"- {line}" for line in verdict_lines(results["verdict"])]
  lines += [
      "",
      "## Setup",
      "",
      f"- **Source domain** (pretraining, forgetting): {results['domains']['source']}. "
      f"Metric: 4-way multiple choice by log-likelihood on {results['n_source']} held-out "
      "questions (distractors: the other skills applied to the same string).",
      f"- **Target domain** (finetuning, learning): {results['domains']['target']}. Metric: "
      f"greedy exact match on {results['n_target']} held-out prompts.",
      f"- **Model**: Llama, d={s['hidden_size']}, {s['num_layers']} layers, {s['num_heads']} "
      f"heads, MLP {s['intermediate_size']}, byte tokenizer; {results['params']:,} parameters.",
      f"- **Base**: {s['pretrain_steps']} steps on {s['source_train']} source samples, "
      f"AdamW lr {s['pretrain_lr']:g}. Base: source acc {base['source_acc']:.3f}, "
      f"target acc {base['target_acc']:.3f}.",
      f"- **Finetuning**: {s['finetune_steps']} steps of {s['batch_rows']} packed rows x "
      f"{s['seq_len']} tokens on {s['target_train']} target samples (loss on responses), "
      f"{s['optimizer']}, cosine schedule with 10% warmup to 1% of the peak LR, grad clip 1. "
      "LoRA: alpha = 2r, no dropout, embeddings and norms frozen. Peak LRs tried: full FT "
      f"{', '.join(f'{x:g}' for x in s['lrs_full'])}; LoRA (r={s['grid_rank']}, all modules) "
      f"{', '.join(f'{x:g}' for x in s['lrs_lora'])}; each method keeps the LR with the lowest "
      "final target validation loss (the paper tuned LRs on the target domain), and the other "
      "LoRA runs use LoRA's. The verdict uses the kept runs; the figures show every run. "
      f"Evaluated every {s['eval_every']} steps.",
      "",
      "## Results (end of finetuning)",
      "",
      "| run | lr | target val loss | target acc | best target acc | source acc | "
      "ΔW rank@90% median / max | time wall / CPU s |",
      "|---|---|---|---|---|---|---|---|",
  ]
  lines += [_row(r) for r in results["runs"]]
  lines += ["", f"Base model: source acc {base['source_acc']:.3f}, target acc "
            f"{base['target_acc']:.3f}. Standard error of an accuracy near 0.5: about "
            f"{0.5 / np.sqrt(max(results['n_target'], 1)):.3f}.", ""]
  captions = {
      "pareto": "Learning (target accuracy) against forgetting (source accuracy) at each "
                "checkpoint; up and to the right is better. The paper's Pareto view.",
      "learning": "Target accuracy during finetuning.",
      "forgetting": "Source accuracy during finetuning.",
      "rank": "Full FT: rank@90% of ΔW per layer and module; dashed lines: the LoRA ranks used.",
      "spectra": "Normalized singular values and cumulative explained variance of W_base, "
                 "full-FT ΔW and LoRA ΔW at one layer.",
  }
  lines += ["## Figures", ""]
  for key, name in figures.items():
    lines += [f"![{key}]({name})", "", f"*{captions[key]}*", ""]
  t = results["timings"]
  lines += ["## Timing", "",
            f"Total {t['total']['wall_s']:.0f} s wall, {t['total']['cpu_s']:.0f} s CPU "
            f"(all threads) on {results['environment']['cpu_count']} CPU cores "
            f"({results['environment']['backend']}). Per phase (wall / CPU s): "
            + ", ".join(f"{k} {v['wall_s']:.0f} / {v['cpu_s']:.0f}"
                        for k, v in t.items() if k != "total") + ".", ""]
  path = os.path.join(out_dir, "report.md")
  atomic_write_text(path, "\n".join(lines))
  return path
