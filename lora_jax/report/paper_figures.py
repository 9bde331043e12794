"""The paper's figures from run directories, with the paper's own numbers as reference series.

Each builder draws one figure when the runs hold its data and appends its Markdown to `lines`:

  Fig. 1   learning (HumanEval / GSM8K) against the training budget (tokens or epochs)
  Fig. 2   forgetting (mean of HellaSwag, ARC-C, WinoGrande) against the budget
  Fig. 3   learning against forgetting
  Fig. 4   LoRA against full FT with weight decay / attention dropout (learning vs forgetting)
  Fig. 5   unique strings among the sampled HumanEval generations, passing and failing
  Fig. 6   rank@90% of ΔW by layer, a panel per module, a line per budget (analyzed runs)
  Fig. 7   LoRA targets x ranks: learning of the last checkpoint against the rank
  Fig. S9  HumanEval pass@k against k (`lora-jax eval --passk-curve`)

A run that matches a paper setting (`report.paper.match`) gets that setting's series from Tables
S1-S8 drawn dashed in its color; `comparison` adds the table "this run vs the paper".
"""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lora_jax import fileio  # noqa: E402
from lora_jax.report import paper, paper_tables as pt, plots  # noqa: E402
from lora_jax.report.runs import FORGETTING, Run  # noqa: E402

FIG_DIR = "figures"


def _x(e, x_axis: str):
  return e.epoch if x_axis == "epoch" else e.tokens


def _figure(lines: list[str], name: str, title: str, caption: str) -> None:
  lines += [f"### {title}", "", f"![{name}]({FIG_DIR}/{name}.png)", "", f"*{caption}*", ""]


def _reference_scale(x_axis: str, m: paper.Match) -> bool:
  """The paper's columns are tokens (CPT) or epochs (IFT): drawn only on that axis."""
  return (x_axis == "epoch") != m.is_cpt


def fig_budget(runs: Sequence[Run], out: str, x_axis: str, target: str, quantity: str,
               lines: list[str]) -> None:
  """Fig. 1 (quantity "learning") or Fig. 2 ("forgetting")."""
  task = target if quantity == "learning" else FORGETTING
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  drawn, refs = False, set()
  for run in runs:
    pts = [(_x(e, x_axis), e.scores[task]) for e in run.evals
           if task in e.scores and _x(e, x_axis)]
    if not pts:
      continue
    (line,) = ax.plot(*zip(*pts), marker="o", markersize=4, label=run.label)
    drawn = True
    m = paper.match(run, target)
    if m and _reference_scale(x_axis, m) and (m.regime, m.method) not in refs:
      refs.add((m.regime, m.method))
      xs, ys = pt.series(m.regime, quantity, m.method)
      ax.plot(xs, ys, ls="--", marker="x", color=line.get_color(), alpha=0.7,
              label=f"{m.label} (Table {pt.table_name(m.regime, quantity)})")
  if not drawn:
    plt.close(fig)
    return
  ax.set_xscale("log", base=2 if x_axis == "epoch" else 10)
  ax.set_xlabel("epochs" if x_axis == "epoch" else "tokens")
  ax.set_ylabel(task)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)
  num, what = ("1", "Learning") if quantity == "learning" else ("2", "Forgetting")
  ax.set_title(f"Fig. {num}: {what} ({task}) against the training budget", fontsize=10)
  name = f"fig{num}_{quantity}_vs_budget"
  plots.save_figure(fig, fileio.join(out, FIG_DIR, f"{name}.png"))
  _figure(lines, name, f"Fig. {num}: {what.lower()} vs budget",
          "Solid: this report's runs at each evaluated checkpoint. Dashed: the paper's numbers "
          "for the setting a run matches (Tables S1-S8).")


def _learning_forgetting(ax, runs, target, x_axis, refs: bool) -> bool:
  drawn, seen = False, set()
  for run in runs:
    pts = [(e.forgetting, e.scores[target]) for e in run.evals
           if e.forgetting is not None and target in e.scores]
    if not pts:
      continue
    (line,) = ax.plot(*zip(*pts), marker="o", markersize=4, label=run.label)
    ax.plot(*pts[-1], marker="*", markersize=10, color=line.get_color())
    drawn = True
    m = paper.match(run, target)
    if refs and m and (m.regime, m.method) not in seen:
      seen.add((m.regime, m.method))
      xs = pt.series(m.regime, "forgetting", m.method)[1]
      ys = pt.series(m.regime, "learning", m.method)[1]
      ax.plot(xs, ys, ls="--", marker="x", color=line.get_color(), alpha=0.7, label=m.label)
  ax.set_xlabel("forgetting score (higher = less forgetting)")
  ax.set_ylabel(f"{target} (learning)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)
  return drawn


def fig_learning_vs_forgetting(runs, out, x_axis, target, lines) -> None:
  """Fig. 3."""
  fig, ax = plt.subplots(figsize=(6.4, 4.6))
  if not _learning_forgetting(ax, runs, target, x_axis, refs=True):
    plt.close(fig)
    return
  ax.set_title("Fig. 3: learning vs forgetting (★ = last checkpoint)", fontsize=10)
  plots.save_figure(fig, fileio.join(out, FIG_DIR, "fig3_learning_vs_forgetting.png"))
  _figure(lines, "fig3_learning_vs_forgetting", "Fig. 3: learning vs forgetting",
          "Up is learning more, right is forgetting less; dashed: the paper's budgets.")


def fig_regularizers(runs, out, x_axis, target, lines) -> None:
  """Fig. 4: drawn when some run is full FT with weight decay or attention dropout."""
  regs = [r for r in runs if paper.regularizer(r) is not None]
  if not regs:
    return
  rest = [r for r in runs if r.method == "lora" or (r.method == "full" and r not in regs)]
  fig, ax = plt.subplots(figsize=(6.4, 4.6))
  if not _learning_forgetting(ax, rest + regs, target, x_axis, refs=True):
    plt.close(fig)
    return
  ax.set_title("Fig. 4: LoRA vs full FT with weight decay / attention dropout", fontsize=10)
  plots.save_figure(fig, fileio.join(out, FIG_DIR, "fig4_regularizers.png"))
  _figure(lines, "fig4_regularizers", "Fig. 4: LoRA vs regularized full finetuning",
          "Regularized runs: " + ", ".join(f"{r.label} ({paper.regularizer(r)})" for r in regs)
          + ". The paper: the regularizers learn and forget like full FT; LoRA forgets less.")


def _last_with(run: Run, task: str, metric: str):
  for e in reversed(run.evals):
    if metric in e.metrics.get(task, {}):
      return e.metrics[task]
  return None


def fig_diversity(runs, out, lines) -> None:
  """Fig. 5: mean unique completions per problem, passing and failing, last checkpoint."""
  rows = [(r.label, m) for r in runs if (m := _last_with(r, "humaneval", "unique_passing"))]
  if not rows:
    return
  fig, ax = plt.subplots(figsize=(max(4.8, 1.2 * len(rows) + 2), 4.0))
  xs = range(len(rows))
  for off, key, label in ((-0.2, "unique_passing", "passing"), (0.2, "unique_failing", "failing")):
    ax.bar([x + off for x in xs], [m.get(key, 0.0) for _, m in rows], width=0.4, label=label)
  ax.set_xticks(list(xs), [lab for lab, _ in rows], rotation=20, fontsize=7)
  ax.set_ylabel("unique strings per problem (mean)")
  ax.set_title("Fig. 5: diversity of sampled HumanEval generations", fontsize=10)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3, axis="y")
  plots.save_figure(fig, fileio.join(out, FIG_DIR, "fig5_diversity.png"))
  _figure(lines, "fig5_diversity", "Fig. 5: unique generations",
          "Among each problem's sampled completions (the paper: 50 at T = 0.2), the number of "
          "distinct strings, for passing and failing samples separately.")


def _budget_of(run: Run) -> float | None:
  if run.train and run.train[-1].get("tokens"):
    return float(run.train[-1]["tokens"])
  return next((float(e.tokens) for e in reversed(run.evals) if e.tokens), None)


def fig_rank_across_budgets(runs, out, lines) -> None:
  """Fig. 6: a panel per module, rank@p of ΔW by layer, a line per analyzed run (by budget)."""
  analyzed = sorted([r for r in runs if r.analysis is not None],
                    key=lambda r: _budget_of(r) or 0.0)
  if not analyzed:
    return
  modules = [m for m in analyzed[0].analysis.modules
             if all(m in r.analysis.modules for r in analyzed)]
  if not modules:
    return
  p = analyzed[0].analysis.meta["variance"]
  fig, axes = plt.subplots(1, len(modules), figsize=(3.6 * len(modules), 3.6), squeeze=False,
                           sharey=True)
  for ax, module in zip(axes[0], modules):
    for r in analyzed:
      layers, ranks = r.analysis.rank_by_layer("delta")[module]
      b = _budget_of(r)
      ax.plot(layers, ranks, marker="o", markersize=3,
              label=f"{r.label} ({b / 1e9:.3g}B)" if b else r.label)
    ax.set_title(module, fontsize=9)
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(f"rank@{p:.0%} of ΔW")
  axes[0][0].legend(fontsize=6)
  fig.suptitle(f"Fig. 6: rank needed to explain {p:.0%} of ΔW's variance, across budgets",
               fontsize=10)
  plots.save_figure(fig, fileio.join(out, FIG_DIR, "fig6_rank_across_budgets.png"))
  _figure(lines, "fig6_rank_across_budgets", "Fig. 6: spectrum of ΔW across budgets",
          "The paper (full-FT code CPT, each budget after its cooldown): ΔW needs 10-100x "
          "typical LoRA ranks, more with more data, more in MLP modules.")


def fig_targets_ranks(runs, out, target, lines) -> None:
  """Fig. 7: LoRA runs' last learning score against the rank, a line per target set."""
  by_targets: dict[str, list] = {}
  for r in runs:
    final = next((e.scores[target] for e in reversed(r.evals) if target in e.scores), None)
    if r.method == "lora" and r.rank and final is not None:
      by_targets.setdefault(str(r.targets or "all"), []).append((r.rank, final))
  if len(by_targets) < 2 and not any(len({k for k, _ in v}) > 1 for v in by_targets.values()):
    return
  fig, ax = plt.subplots(figsize=(6.0, 4.0))
  for targets, pts in sorted(by_targets.items()):
    ax.plot(*zip(*sorted(pts)), marker="o", label=f"LoRA {targets}")
  fulls = [e.scores[target] for r in runs if r.method == "full" for e in r.evals[-1:]
           if target in e.scores]
  if fulls:
    ax.axhline(max(fulls), color="black", ls=":", label="full FT (best)")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("LoRA rank")
  ax.set_ylabel(target)
  ax.set_title("Fig. 7: LoRA target modules x ranks (last checkpoint)", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  plots.save_figure(fig, fileio.join(out, FIG_DIR, "fig7_targets_ranks.png"))
  _figure(lines, "fig7_targets_ranks", "Fig. 7: targets x ranks",
          "The paper: all modules beat attention-only and MLP-only; rank matters less than "
          "targets.")


def fig_passk(runs, out, lines) -> None:
  """Fig. S9: pass@k against k, from evals with a pass@k curve (4 or more ks)."""
  curves = {}
  for r in runs:
    for e in reversed(r.evals):
      ks = sorted(int(k[len("pass@"):]) for k in e.metrics.get("humaneval", {})
                  if k.startswith("pass@") and k[len("pass@"):].isdigit())
      if len(ks) >= 4:
        curves[r.label] = (ks, [e.metrics["humaneval"][f"pass@{k}"] for k in ks])
        break
  if not curves:
    return
  fig, ax = plt.subplots(figsize=(6.0, 4.0))
  for label, (ks, ys) in curves.items():
    ax.plot(ks, ys, label=label)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("k")
  ax.set_ylabel("HumanEval pass@k")
  ax.set_title("Fig. S9: pass@k (the paper: n = 256 samples at T = 0.8)", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  plots.save_figure(fig, fileio.join(out, FIG_DIR, "figS9_passk.png"))
  _figure(lines, "figS9_passk", "Fig. S9: pass@k", "Unbiased pass@k estimates for k = 1..n.")


def comparison(runs, target, lines, table) -> None:
  rows = paper.comparison_rows(runs, target)
  lines += ["### This run vs the paper", ""]
  if not rows:
    lines += ["No run matches a paper setting at a paper budget (the paper tabulates full FT "
              "and LoRA r = 16 / 64 / 256 on all modules, HumanEval or GSM8K, at 0.25-20B "
              "tokens or 1-16 epochs).", ""]
    return
  lines += table(["run", "paper setting", "budget", "quantity", "this run", "paper",
                  "difference", "table"], rows)
  lines += [f"Paper values: {pt.SOURCE}.", ""]


def sections(runs: Sequence[Run], out: str, x_axis: str, target: str | None, table) -> list[str]:
  """The "Against the paper" section: every figure the runs support and the comparison table."""
  lines = ["## Against the paper", ""]
  if target:
    fig_budget(runs, out, x_axis, target, "learning", lines)
    fig_budget(runs, out, x_axis, target, "forgetting", lines)
    fig_learning_vs_forgetting(runs, out, x_axis, target, lines)
    fig_regularizers(runs, out, x_axis, target, lines)
  fig_diversity(runs, out, lines)
  fig_rank_across_budgets(runs, out, lines)
  if target:
    fig_targets_ranks(runs, out, target, lines)
  fig_passk(runs, out, lines)
  if target:
    comparison(runs, target, lines, table)
  return lines
