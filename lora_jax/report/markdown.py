"""`write_report`: one Markdown report with PNG figures from a set of run directories.

    from lora_jax.report import write_report
    write_report(["runs/full", "runs/lora_r16", "runs/lora_r256"], "report/")

Figures (under `<out>/figures/`, each only when its data exists): loss.png, target.png and
forgetting.png (curves over tokens or epochs), pareto.png (learning vs forgetting, one point per
checkpoint in training order), rank_by_layer.png (rank@p of dW per layer, a line per module,
a panel per analyzed run), spectra.png (W_base vs dW of each analyzed run vs a random Gaussian
matrix), intruders.png (intruder dimensions per layer); then the paper's figures 1-7 and S9 that
the runs support, with the paper's numbers as reference, and "this run vs the paper"
(`report.paper_figures`).
"""

from __future__ import annotations

import datetime
import os
import re
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lora_jax import fileio  # noqa: E402
from lora_jax.analysis.baseline import random_baseline  # noqa: E402
from lora_jax.fileio import atomic_write_text  # noqa: E402
from lora_jax.lora import ALL_MODULES  # noqa: E402
from lora_jax.report import paper_figures, plots  # noqa: E402
from lora_jax.report.runs import (FORGETTING, FORGETTING_TASKS, Run, load_runs,  # noqa: E402
                                  pick_target, pick_x_axis)

FIG_DIR = "figures"
REPORT_FILE = "report.md"


def _fmt(x, digits: int = 3) -> str:
  if x is None:
    return "–"
  if isinstance(x, float):
    if not np.isfinite(x):
      return str(x)
    return f"{x:.{digits}g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.{digits}f}"
  return str(x)


def fmt_tokens(n) -> str:
  if n is None:
    return "–"
  for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if abs(n) >= div:
      return f"{n / div:.3g}{suffix}"
  return f"{n:g}"


def _point_label(e, x_axis: str) -> str | None:
  if x_axis == "epoch" and e.epoch is not None:
    return f"{e.epoch:g}ep"
  return fmt_tokens(e.tokens) if e.tokens is not None else None


def _table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |"
          for r in rows]
  return out + [""]


def _figure(lines: list[str], rel: str, caption: str) -> None:
  alt = os.path.splitext(os.path.basename(rel))[0].replace("_", " ")
  lines += [f"![{alt}]({rel})", "", f"*{caption}*", ""]


# --------------------------------------------------------------------------- figure builders
def _curves(runs, out, x_axis, target, lines) -> None:
  xlabel = "epochs" if x_axis == "epoch" else "tokens"
  loss = {r.label: r.curve("loss", x_axis) for r in runs}
  loss = {k: v for k, v in loss.items() if v[0]}
  lines.append("## Learning curves\n")
  if loss:
    n = max(len(v[0]) for v in loss.values())
    plots.plot_learning_curves(loss, fileio.join(out, FIG_DIR, "loss.png"), xlabel=xlabel,
                               ylabel="training loss", title="Training loss",
                               smooth=max(1, n // 50))
    _figure(lines, f"{FIG_DIR}/loss.png", f"Training loss against {xlabel}.")
  for task, name, title in ((target, "target.png", f"{target} during training"),
                            (FORGETTING, "forgetting.png",
                             "Forgetting score (mean of HellaSwag, ARC-Challenge, WinoGrande)")):
    if task is None:
      continue
    curves = {r.label: r.eval_curve(task, x_axis) for r in runs}
    curves = {k: v for k, v in curves.items() if v[0]}
    if curves:
      plots.plot_learning_curves(curves, fileio.join(out, FIG_DIR, name), xlabel=xlabel,
                                 ylabel=task, title=title)
      _figure(lines, f"{FIG_DIR}/{name}", f"{title} against {xlabel}.")
  if len(lines) == 1:
    lines.append("No training metrics or evaluations found.\n")


def _pareto(runs, out, x_axis, target, lines) -> None:
  lines.append("## Learning vs forgetting\n")
  points = {}
  for r in runs:
    pts = [(e.forgetting, e.scores[target], _point_label(e, x_axis)) for e in r.evals
           if e.forgetting is not None and target in e.scores]
    if pts:
      points[r.label] = pts
  if not points:
    lines.append(f"No checkpoint has both `{target}` and a forgetting score "
                 f"(mean of {', '.join(FORGETTING_TASKS)}).\n")
    return
  plots.plot_pareto(points, fileio.join(out, FIG_DIR, "pareto.png"),
                    xlabel="forgetting score (higher = less forgetting)",
                    ylabel=f"{target} (learning)",
                    title=f"Learning ({target}) vs forgetting, one point per checkpoint")
  _figure(lines, f"{FIG_DIR}/pareto.png",
          "Each line follows one run's checkpoints in training order (★ = last). Up is learning "
          "more, right is forgetting less.")
  rows = []
  for r in runs:
    if r.label in points:
      first, last = points[r.label][0], points[r.label][-1]
      rows.append([r.label, len(points[r.label]), first[1], last[1], first[0], last[0]])
  lines += _table(["run", "checkpoints", f"{target} first", f"{target} last",
                   "forgetting first", "forgetting last"], rows)


def _spectral(runs, out, random_n, random_seed, module, lines) -> None:
  analyzed = [r for r in runs if r.analysis is not None]
  lines.append("## Spectral analysis\n")
  if not analyzed:
    lines.append("No run has an `analysis/` directory (run `lora-jax analyze --out "
                 "<run>/analysis ...`).\n")
    return
  p = analyzed[0].analysis.meta["variance"]
  # rank@p of dW by layer, one panel per analyzed run
  fig, axes = plt.subplots(1, len(analyzed), figsize=(5.2 * len(analyzed), 4.0), squeeze=False,
                           sharey=True)
  for ax, r in zip(axes[0], analyzed):
    plots.plot_rank_by_layer(r.analysis.rank_by_layer("delta"), None, title=r.label,
                             ylabel=f"rank@{p:.0%} of ΔW", ax=ax)
  fig.suptitle(f"Rank needed to explain {p:.0%} of the variance of ΔW, by layer", fontsize=10)
  plots.save_figure(fig, fileio.join(out, FIG_DIR, "rank_by_layer.png"))
  _figure(lines, f"{FIG_DIR}/rank_by_layer.png",
          f"rank@{p:.0%} of ΔW = W_ft − W_base per layer, one line per module type; dashed lines "
          "mark typical LoRA ranks.")
  modules = [m for m in ALL_MODULES if any(m in r.analysis.modules for r in analyzed)]
  rows = []
  for r in analyzed:
    s = r.analysis.summary()
    rows.append([r.label] + [(f"{s[m]['mean_rank_delta']:.1f} / {s[m]['max_rank']}"
                              if m in s else "–") for m in modules])
  lines.append(f"Mean rank@{p:.0%} of ΔW over layers (/ full rank):\n")
  lines += _table(["run"] + modules, rows)
  rel_rows = [[r.label] + [r.analysis.summary().get(m, {}).get("mean_rel_delta_norm")
                           for m in modules] for r in analyzed]
  lines.append("Mean relative update size ‖ΔW‖_F / ‖W_base‖_F:\n")
  lines += _table(["run"] + modules, rel_rows)

  # spectra of one matrix: W_base, each run's dW, a random Gaussian matrix
  common = [m for m in modules if all(m in r.analysis.modules for r in analyzed)]
  module = module if module in common else (common[0] if common else None)
  rb = None
  for r in analyzed:
    rb = r.analysis.meta.get("random_baseline")
    if rb is not None and "random.A" in r.analysis.spectra:
      rand_s = r.analysis.spectra["random.A"]
      break
  else:
    rb = random_baseline(n=random_n, c=1.0, p=p, seed=random_seed)
    rand_s = rb.pop("spectrum_A")
    rb.pop("spectrum_A_plus_cB")
  if module is not None:
    first = analyzed[0].analysis
    layers = list(first.spectra[f"{module}.layers"])
    layer = plots.pick_layer(layers)
    curves = {"W_base": first.spectra[f"{module}.base"][layers.index(layer)]}
    for r in analyzed:
      ls = list(r.analysis.spectra[f"{module}.layers"])
      if layer in ls:
        curves[f"ΔW {r.label}"] = r.analysis.spectra[f"{module}.delta"][ls.index(layer)]
    curves[f"random {rb['shape'][0]}×{rb['shape'][1]}"] = rand_s
    plots.plot_spectra(curves, fileio.join(out, FIG_DIR, "spectra.png"),
                       title=f"Spectra of layer {layer} {module}", variance=p)
    _figure(lines, f"{FIG_DIR}/spectra.png",
            "Left: singular values normalized by the largest, against the normalized index. "
            f"Right: cumulative explained variance; the dashed line is {p:.0%}. A LoRA ΔW stops at "
            "its rank; a full-finetuning ΔW looks like W_base and the random matrix.")
  lines.append(
      f"Random baseline: a Gaussian {rb['shape'][0]}×{rb['shape'][1]} matrix A needs rank "
      f"{rb['rank_A']} ({rb['rank_fraction_A']:.0%}) to explain {p:.0%} of its variance, "
      f"A + {rb['c']:g}·B needs {rb['rank_A_plus_cB']}; the Marchenko–Pastur expectation is "
      f"{rb['mp_expected_rank']:.0f}.\n")

  with_intruders = [r for r in analyzed if r.analysis.meta.get("intruders")]
  if with_intruders:
    cfg = with_intruders[0].analysis.meta["intruders"]
    counts = {}
    for r in with_intruders:
      per_layer: dict[int, int] = {}
      for row in r.analysis.rows:
        per_layer[row["layer"]] = per_layer.get(row["layer"], 0) + int(row["intruders"])
      ls = sorted(per_layer)
      counts[r.label] = (ls, [per_layer[l] for l in ls])
    plots.plot_intruders_by_layer(counts, fileio.join(out, FIG_DIR, "intruders.png"),
                                  k=cfg["k"] * len(modules), eps=cfg["eps"],
                                  title="Intruder dimensions per layer (all modules)",
                                  ylabel=f"intruders (top-{cfg['k']} of each of {len(modules)} "
                                         f"modules, ε={cfg['eps']})")
    _figure(lines, f"{FIG_DIR}/intruders.png",
            f"Singular vectors among each matrix's top {cfg['k']} whose max |cos| with every base "
            f"singular vector is below ε={cfg['eps']} (Shuttleworth et al. 2024), summed over modules.")
    rows = [[r.label] + [r.analysis.summary().get(m, {}).get("total_intruders") for m in modules]
            for r in with_intruders]
    lines.append("Intruder dimensions, total over layers:\n")
    lines += _table(["run"] + modules, rows)


# --------------------------------------------------------------------------- entry point
def write_report(runs: Sequence[str | Run], out_dir: str, *, target: str | None = None,
                 x_axis: str = "auto", title: str = "LoRA Learns Less and Forgets Less: report",
                 random_n: int = 1000, random_seed: int = 0, module: str | None = None,
                 paper: bool = True) -> dict:
  """Writes `<out_dir>/report.md` and its figures; returns {"report": path, "figures": [...]}.

  `runs`: run directories or loaded `Run`s. `target`: the learning task (default: the most
  frequently evaluated non-forgetting task). `x_axis`: "tokens", "epoch" or "auto" (epochs when
  every run did at least one). `random_n`: size of the random baseline matrix when no analysis
  carries one. `module`: the module whose spectra are plotted (default: the first analyzed).
  `paper`: add the paper's figures and the comparison with its tables (`report.paper_figures`).
  """
  if not runs:
    raise ValueError("write_report: no runs given")
  paths = [r for r in runs if not isinstance(r, Run)]
  loaded = load_runs(paths) if paths else []
  it = iter(loaded)
  runs = [r if isinstance(r, Run) else next(it) for r in runs]
  if x_axis == "auto":
    x_axis = pick_x_axis(runs)
  elif x_axis == "epochs":
    x_axis = "epoch"
  if x_axis not in ("tokens", "epoch", "step"):
    raise ValueError(f"x_axis must be tokens, epoch(s), step or auto; got {x_axis!r}")
  target = target or pick_target(runs)
  fileio.makedirs(fileio.join(out_dir, FIG_DIR))

  lines = [f"# {title}", "",
           f"Generated by `lora-jax report` on {datetime.date.today().isoformat()} from "
           f"{len(runs)} run(s). Learning task: `{target or 'none found'}`; forgetting score: "
           f"mean of {', '.join(FORGETTING_TASKS)} (higher = less forgetting).", "", "## Runs", ""]
  rows = []
  for r in runs:
    last = r.train[-1] if r.train else {}
    final = r.evals[-1] if r.evals else None
    rows.append([r.label, r.method or "?", r.rank, r.targets or ("all" if r.method == "full" else "–"),
                 r.lr, last.get("step"), fmt_tokens(last.get("tokens")), last.get("loss"),
                 final.scores.get(target) if final and target else None,
                 final.forgetting if final else None, f"`{r.path}`"])
  lines += _table(["run", "method", "rank", "targets", "lr", "steps", "tokens", "final loss",
                   f"final {target or 'target'}", "final forgetting", "path"], rows)
  sections = [lambda ls: _curves(runs, out_dir, x_axis, target, ls)]
  if target:
    sections.append(lambda ls: _pareto(runs, out_dir, x_axis, target, ls))
  sections.append(lambda ls: _spectral(runs, out_dir, random_n, random_seed, module, ls))
  if paper:
    sections.append(lambda ls: ls.extend(paper_figures.sections(runs, out_dir, x_axis, target,
                                                                _table)))
  for section in sections:
    part: list[str] = []
    section(part)
    lines += part

  lines += ["## Definitions", "",
            "- rank@p: smallest k with Σ_{i≤k} σ_i² ≥ p·Σ σ_i² (σ: singular values, descending).",
            "- effective rank (in analysis.json): exp(entropy of σ / Σσ) (Roy & Vetterli 2007).",
            "- ΔW of a LoRA run is s·A·B; its singular values come from the factors exactly.",
            "- Forgetting score: mean accuracy on HellaSwag, ARC-Challenge and WinoGrande.", ""]
  report = fileio.join(out_dir, REPORT_FILE)
  atomic_write_text(report, "\n".join(lines))
  figures = [fileio.join(out_dir, rel) for rel in re.findall(r"!\[[^\]]*\]\(([^)]+)\)",
                                                             "\n".join(lines))]
  return {"report": report, "figures": figures, "target": target, "x_axis": x_axis}
