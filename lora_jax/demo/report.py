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
    "regularizers": "regularizers.png",
    "diversity": "diversity.png",
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
  regs = [r for r in runs if r.get("role") == "regularizer"]
  if regs:
    paths["regularizers"] = plot_regularizers(results, os.path.join(out_dir,
                                                                    FIGURES["regularizers"]))
  if (results.get("diversity") or {}).get("models"):
    paths["diversity"] = plot_diversity(results["diversity"],
                                        os.path.join(out_dir, FIGURES["diversity"]))
  return {k: os.path.basename(v) for k, v in paths.items() if v}


def regularizer_comparison_runs(results: dict) -> list[dict]:
  """The runs of claim (d): plain full FT (kept), each regularized run, LoRA on all modules."""
  kept = [r for r in results["runs"] if r.get("selected", True)]
  plain = [r for r in kept if r["rank"] == 0 and r.get("role") != "regularizer"]
  regs = [r for r in kept if r.get("role") == "regularizer"]
  lora = sorted((r for r in kept if r["rank"] > 0 and r["targets"] == "all"),
                key=lambda r: r["rank"])
  return plain + regs + lora


def plot_regularizers(results: dict, path: str) -> str:
  """The paper's Fig. 4: learning (target acc) and forgetting (source acc) over training for
  full FT, full FT with weight decay / attention dropout, and LoRA; plus the end points."""
  plt = plots.plt
  runs = regularizer_comparison_runs(results)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for r in runs:
    style = "--" if r.get("role") == "regularizer" else ("-" if r["rank"] == 0 else ":")
    steps = [p["step"] for p in r["curve"]]
    kw = dict(ls=style, marker="o", markersize=3, label=r["label"])
    (line,) = axes[0].plot(steps, [p["target_acc"] for p in r["curve"]], **kw)
    axes[1].plot(steps, [p["source_acc"] for p in r["curve"]], color=line.get_color(), **kw)
    axes[2].plot([p["source_acc"] for p in r["curve"]], [p["target_acc"] for p in r["curve"]],
                 color=line.get_color(), **kw)
    end = r["curve"][-1]
    axes[2].plot([end["source_acc"]], [end["target_acc"]], marker="*", markersize=11,
                 color=line.get_color())
  base = results["base"]
  axes[2].plot([base["source_acc"]], [base["target_acc"]], marker="s", color="black", ls="none",
               label="base")
  for ax, (xl, yl, t) in zip(axes, [
      ("finetuning step", "target accuracy", "Learning (target domain)"),
      ("finetuning step", "source accuracy", "Forgetting (source domain; lower = more forgotten)"),
      ("source accuracy", "target accuracy", "Learning vs forgetting (* = end)")]):
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title(t, fontsize=10)
    ax.grid(alpha=0.3)
  axes[2].legend(fontsize=7)
  fig.suptitle("LoRA vs regularized full FT (the paper's Fig. 4): dashed = weight decay / "
               "attention dropout, solid = full FT, dotted = LoRA", fontsize=10)
  return plots.save_figure(fig, path)


def plot_diversity(diversity: dict, path: str) -> str:
  """The paper's Fig. 5: unique strings among the samples of each prompt, correct and
  incorrect, per model."""
  plt = plots.plt
  models = list(diversity["models"].values())
  labels = [m["label"] for m in models]
  k = max(diversity["n_prompts"], 1)
  correct = [m["unique_correct_total"] / k for m in models]
  wrong = [m["unique_incorrect_total"] / k for m in models]
  x = np.arange(len(models))
  fig, ax = plt.subplots(figsize=(7.2, 4.2))
  ax.bar(x - 0.2, correct, 0.4, label="among correct samples (at most 1: one right answer)")
  ax.bar(x + 0.2, wrong, 0.4, label="among incorrect samples")
  for i, m in enumerate(models):
    ax.annotate(f"{m['unique_mean']:.2f}", (x[i], max(correct[i], wrong[i])), ha="center",
                fontsize=7, xytext=(0, 3), textcoords="offset points")
  ax.set_xticks(x)
  ax.set_xticklabels(labels, rotation=20, fontsize=8)
  _title = (f"Unique strings per prompt among {diversity['n_samples']} samples "
            f"(T={diversity['temperature']:g}, top-p {diversity['top_p']:g}; numbers: all samples)")
  plots._finish_axes(ax, "", "unique strings per prompt", _title)
  return plots.save_figure(fig, path)


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
      "final target validation loss (the paper tuned LRs on the target domain), the other "
      "LoRA runs use LoRA's and the regularized full-FT runs full FT's. The verdict uses the kept "
      "runs; the figures show every run. "
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
  reg = results.get("regularizers")
  if reg:
    wds = ", ".join(f"{w:.2g}" for w in reg["weight_decays"])
    shrink = ", ".join(f"{100 * x:.1f}%" for x in reg["weight_shrink"])
    lines += [
        "## Claim (d): LoRA vs weight decay and attention dropout", "",
        f"Full FT at the selected full-FT LR ({reg['lr']:g}) with decoupled weight decay {wds} "
        f"(`optimizer.weight_decay`) and with attention dropout "
        f"{', '.join(f'{p:g}' for p in reg['attention_dropouts'])} (`model.attention_dropout`). "
        f"The weight decays are the paper's "
        f"{', '.join(f'{w:g}' for w in reg['paper_weight_decays'])} (code IFT, "
        f"{reg['paper_steps_per_epoch']} steps per epoch) rescaled to equal total decay per "
        f"epoch: the demo takes {reg['steps_per_epoch']} steps per epoch "
        f"({reg['epochs']:.1f} epochs in {s['finetune_steps']} steps), and decoupled decay "
        "shrinks every weight by wd x lr(t)/peak per step, so wd_demo = wd_paper x "
        f"{reg['paper_steps_per_epoch']}/{reg['steps_per_epoch']}. Over the run (sum of the LR "
        f"factor {reg['schedule_factor_sum']:.0f}) decay alone shrinks every weight by {shrink}, "
        "as the paper's values do over the same number of epochs. Dropout rates are "
        "probabilities per attention weight, independent of scale: the paper's values.", ""]
  div = results.get("diversity")
  if div and div.get("models"):
    lines += [
        "## Claim (e): diversity of generations", "",
        f"{div['n_samples']} samples per prompt for the first {div['n_prompts']} held-out target "
        f"prompts, temperature {div['temperature']:g}, top-p {div['top_p']:g} (the paper's "
        "HumanEval setting), through `generate`. A target prompt has exactly one correct answer, "
        "so at most one unique correct string per prompt: the informative counts are the unique "
        "incorrect strings and the unique strings among all samples.", "",
        "| model | unique strings / prompt | unique correct (total) | unique incorrect (total) | "
        "samples correct |", "|---|---|---|---|---|"]
    for m in div["models"].values():
      lines.append(f"| {m['label']} | {m['unique_mean']:.2f} | {m['unique_correct_total']} | "
                   f"{m['unique_incorrect_total']} | {m['correct_fraction']:.3f} |")
    lines.append("")
  captions = {
      "pareto": "Learning (target accuracy) against forgetting (source accuracy) at each "
                "checkpoint; up and to the right is better. The paper's Pareto view.",
      "learning": "Target accuracy during finetuning.",
      "forgetting": "Source accuracy during finetuning.",
      "rank": "Full FT: rank@90% of ΔW per layer and module; dashed lines: the LoRA ranks used.",
      "spectra": "Normalized singular values and cumulative explained variance of W_base, "
                 "full-FT ΔW and LoRA ΔW at one layer.",
      "regularizers": "Claim (d), as the paper's Fig. 4: learning and forgetting of full FT, "
                      "full FT with weight decay / attention dropout, and LoRA.",
      "diversity": "Claim (e), as the paper's Fig. 5: unique strings among the samples of each "
                   "prompt, for correct and incorrect samples.",
  }
  lines += ["## Figures", ""]
  for key, name in figures.items():
    lines += [f"![{key}]({name})", "", f"*{captions[key]}*", ""]
  t = results["timings"]
  lines += ["## Timing", "",
            f"Total {t['total']['wall_s']:.0f} s wall, {t['total']['cpu_s']:.0f} s CPU "
            f"(all threads) on {results['environment']['cpu_count']} CPU cores "
            f"({results['environment'].get('cpu_model', '?')}, "
            f"{results['environment']['backend']}); {t['total'].get('compile_s', 0):.0f} s of "
            "it compiling. Per phase (wall / CPU / compile s): "
            + ", ".join(f"{k} {v['wall_s']:.0f} / {v['cpu_s']:.0f} / {v.get('compile_s', 0):.0f}"
                        for k, v in t.items() if k != "total") + ".", ""]
  path = os.path.join(out_dir, "report.md")
  atomic_write_text(path, "\n".join(lines))
  return path
