"""The paper's figures as library functions (matplotlib, Agg backend; PNGs written atomically).

Each takes plain data so the demo and notebooks can call them with their own numbers:

  plot_rank_by_layer(ranks_by_module, path)        rank@90% of dW per layer, a line per module
  plot_spectra(spectra_by_label, path)             normalized spectra + cumulative variance
  plot_pareto(points_by_run, path, xlabel, ylabel) learning vs forgetting, checkpoints in order
  plot_learning_curves(curves_by_run, path, ...)   a metric over tokens or epochs
  plot_intruders_by_layer(counts_by_module, path)  intruder dimensions per layer
  plot_analysis(analysis, out_dir)                 the figures of one `analyze` result
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from lora_jax import fileio  # noqa: E402
from lora_jax.fileio import atomic_write_bytes  # noqa: E402
from lora_jax.analysis.spectra import explained_variance, normalized_spectrum  # noqa: E402

# Colors and markers fixed per module type so figures are comparable across runs.
MODULE_STYLE = {
    "q_proj": ("tab:blue", "o"), "k_proj": ("tab:orange", "s"), "v_proj": ("tab:green", "^"),
    "o_proj": ("tab:red", "v"), "gate_proj": ("tab:purple", "D"), "up_proj": ("tab:brown", "P"),
    "down_proj": ("tab:pink", "X"),
}
DPI = 120


def save_figure(fig, path: str) -> str:
  """Saves `fig` as PNG atomically (write to memory, then rename into place) and closes it."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
  plt.close(fig)
  atomic_write_bytes(path, buf.getvalue())
  return path


def _finish_axes(ax, xlabel: str, ylabel: str, title: str, legend_cols: int = 1) -> None:
  """The labels, title, grid and legend every single-axes figure here shares."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=legend_cols)


def plot_rank_by_layer(ranks_by_module: Mapping[str, tuple[Sequence[int], Sequence[float]]],
                       path: str, title: str = "Rank needed to explain 90% of the variance of ΔW",
                       ylabel: str = "rank@90% of ΔW", reference_ranks: Sequence[int] = (16, 256),
                       max_rank: int | None = None, ax=None) -> str | None:
  """One line per module type: {module: (layers, ranks)}; dashed lines at typical LoRA ranks.

  With `ax` the lines are drawn there and nothing is saved (for multi-panel figures).
  """
  own = ax is None
  if own:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
  top = 0.0
  for module, (layers, ranks) in ranks_by_module.items():
    color, marker = MODULE_STYLE.get(module, (None, "o"))
    ax.plot(layers, ranks, marker=marker, color=color, label=module, markersize=4)
    top = max(top, float(np.max(ranks)) if len(ranks) else 0.0)
  for r in reference_ranks:
    if r <= 1.2 * max(top, 1):
      ax.axhline(r, color="gray", ls="--", lw=0.8)
      ax.annotate(f"LoRA r={r}", (0, r), xycoords=("axes fraction", "data"), fontsize=7,
                  color="gray", va="bottom")
  if max_rank:
    ax.axhline(max_rank, color="black", ls=":", lw=0.8)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylim(bottom=0)
  _finish_axes(ax, "layer", ylabel, title, legend_cols=2)
  return save_figure(fig, path) if own else None


def plot_spectra(spectra_by_label: Mapping[str, np.ndarray], path: str,
                 title: str = "Spectra", variance: float = 0.9) -> str:
  """Left: s_i / s_1 against i / K (log y). Right: cumulative explained variance against i / K
  with the `variance` threshold, so matrices of different sizes and scales share axes."""
  fig, (ax_s, ax_c) = plt.subplots(1, 2, figsize=(10, 3.8))
  for label, s in spectra_by_label.items():
    s = np.asarray(s, np.float64)
    x = np.arange(1, len(s) + 1) / max(len(s), 1)  # K includes exact zeros (a LoRA dW's tail)
    nz = s > 0
    ax_s.plot(x[nz], normalized_spectrum(s)[nz], label=label)
    ax_c.plot(x, explained_variance(s), label=label)
  ax_s.set_yscale("log")
  ax_s.set_xlabel("normalized index i / K")
  ax_s.set_ylabel(r"$\sigma_i / \sigma_1$")
  ax_c.axhline(variance, color="gray", ls="--", lw=0.8)
  ax_c.set_xlabel("normalized rank k / K")
  ax_c.set_ylabel(r"explained variance $\sum_{i \leq k} \sigma_i^2 / \sum_i \sigma_i^2$")
  for ax in (ax_s, ax_c):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  return save_figure(fig, path)


def plot_pareto(points_by_run: Mapping[str, Sequence[tuple]], path: str, xlabel: str,
                ylabel: str, title: str = "Learning vs forgetting",
                base_point: tuple[float, float] | None = None) -> str:
  """Learning (y) against forgetting (x), one line per run through its checkpoints in training
  order. Points are (x, y) or (x, y, label); labels (e.g. "4ep") annotate the points."""
  fig, ax = plt.subplots(figsize=(6.4, 4.6))
  for run, points in points_by_run.items():
    if not points:
      continue
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    (line,) = ax.plot(xs, ys, marker="o", markersize=4, label=run)
    ax.plot(xs[-1:], ys[-1:], marker="*", markersize=10, color=line.get_color())
    for p in points:
      if len(p) > 2 and p[2] is not None:
        ax.annotate(str(p[2]), (p[0], p[1]), fontsize=6, xytext=(3, 3), textcoords="offset points")
  if base_point is not None:
    ax.plot([base_point[0]], [base_point[1]], marker="s", color="black", ls="none", label="base")
  _finish_axes(ax, xlabel, ylabel, title)
  return save_figure(fig, path)


def plot_learning_curves(curves_by_run: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                         path: str, xlabel: str = "tokens", ylabel: str = "loss",
                         title: str = "Learning curves", logx: bool = False,
                         smooth: int = 1) -> str:
  """One line per run: {run: (xs, ys)}; `smooth` > 1 applies a trailing moving average."""
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for run, (xs, ys) in curves_by_run.items():
    ys = np.asarray(ys, np.float64)
    if smooth > 1 and len(ys) >= smooth:
      kernel = np.ones(smooth) / smooth
      ys = np.concatenate([ys[:smooth - 1], np.convolve(ys, kernel, mode="valid")])
    ax.plot(xs, ys, label=run, marker="o" if len(ys) <= 20 else None, markersize=3)
  if logx:
    ax.set_xscale("log")
  _finish_axes(ax, xlabel, ylabel, title)
  return save_figure(fig, path)


def plot_intruders_by_layer(counts_by_module: Mapping[str, tuple[Sequence[int], Sequence[int]]],
                            path: str, k: int = 10, eps: float = 0.5,
                            title: str | None = None, ylabel: str | None = None) -> str:
  """Intruder dimensions among the top-k singular vectors per layer, a line per module type."""
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for module, (layers, counts) in counts_by_module.items():
    color, marker = MODULE_STYLE.get(module, (None, "o"))
    ax.plot(layers, counts, marker=marker, color=color, label=module, markersize=4)
  ax.set_ylim(-0.3, k + 0.3)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  _finish_axes(ax, "layer", ylabel or f"intruders in top-{k} (ε={eps})",
               title or "Intruder dimensions (Shuttleworth et al. 2024)", legend_cols=2)
  return save_figure(fig, path)


def pick_layer(layers: Sequence[int]) -> int:
  """The middle analyzed layer (the paper's example matrices come from the middle of the net)."""
  layers = sorted(layers)
  return layers[len(layers) // 2]


def plot_analysis(analysis, out_dir: str, random_spectrum: np.ndarray | None = None,
                  module: str | None = None) -> dict[str, str]:
  """Figures of one `analyze` result: rank_by_layer.png, spectra.png, intruders.png (if any)."""
  p = analysis.meta["variance"]
  paths = {"rank_by_layer": plot_rank_by_layer(
      analysis.rank_by_layer("delta"), fileio.join(out_dir, "rank_by_layer.png"),
      title=f"Rank needed to explain {p:.0%} of the variance of ΔW",
      ylabel=f"rank@{p:.0%} of ΔW")}
  module = module or analysis.modules[0]
  layers = list(analysis.spectra[f"{module}.layers"])
  layer = pick_layer(layers)
  i = layers.index(layer)
  curves = {"W_base": analysis.spectra[f"{module}.base"][i],
            "W_ft": analysis.spectra[f"{module}.ft"][i],
            "ΔW": analysis.spectra[f"{module}.delta"][i]}
  if random_spectrum is None:
    random_spectrum = analysis.spectra.get("random.A")
  if random_spectrum is not None:
    curves["random Gaussian"] = random_spectrum
  paths["spectra"] = plot_spectra(curves, fileio.join(out_dir, "spectra.png"),
                                  title=f"layer {layer} {module}", variance=p)
  if analysis.meta.get("intruders"):
    cfg = analysis.meta["intruders"]
    counts = {m: analysis.column(m, "intruders") for m in analysis.modules}
    paths["intruders"] = plot_intruders_by_layer(counts, fileio.join(out_dir, "intruders.png"),
                                                 k=cfg["k"], eps=cfg["eps"])
  return paths
