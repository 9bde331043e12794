"""Reports: the paper's figures as library functions and a Markdown report over run directories.

    from lora_jax.report import write_report, plot_pareto
    write_report(["runs/full", "runs/lora_r16"], "report/")

`paper_tables` holds the paper's Tables S1-S8, `paper` matches runs to the paper's settings and
`paper_figures` draws Figs. 1-7 and S9 with the paper's numbers as reference series.
"""

from lora_jax.report.markdown import write_report
from lora_jax.report.plots import (plot_analysis, plot_intruders_by_layer, plot_learning_curves,
                                   plot_pareto, plot_rank_by_layer, plot_spectra, save_figure)
from lora_jax.report.runs import EvalPoint, Run, load_run, load_runs, pick_target, pick_x_axis

__all__ = [
    "write_report", "plot_analysis", "plot_intruders_by_layer", "plot_learning_curves",
    "plot_pareto", "plot_rank_by_layer", "plot_spectra", "save_figure", "EvalPoint", "Run",
    "load_run", "load_runs", "pick_target", "pick_x_axis",
]
