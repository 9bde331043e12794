"""Reports: reading run dirs (fixtures in tests/fixtures/report/), plot functions, write_report."""

import json
import os
import re
import shutil

import matplotlib.image as mpimg
import numpy as np
import pytest

from lora_jax import analysis, report
from lora_jax.lora import LoraConfig
from lora_jax.report import runs as runs_lib

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "report")


def _params(rng, layers=3, lora_rank=None):
  """A minimal params tree (q_proj [32, 32], down_proj [48, 32]) with optional LoRA leaves."""
  out = {}
  for i in range(layers):
    mods = {}
    for group, name, shape in (("self_attn", "q_proj", (32, 32)), ("mlp", "down_proj", (48, 32))):
      mod = {"kernel": (0.1 * rng.standard_normal(shape)).astype(np.float32)}
      if lora_rank:
        mod["lora_a"] = (0.1 * rng.standard_normal((shape[0], lora_rank))).astype(np.float32)
        mod["lora_b"] = (0.1 * rng.standard_normal((lora_rank, shape[1]))).astype(np.float32)
      mods.setdefault(group, {})[name] = mod
    out[f"layers_{i}"] = mods
  return out


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
  """The fixture runs plus an `analysis/` dir in each, produced by the real analyze pipeline."""
  root = tmp_path_factory.mktemp("runs")
  full, lora = str(root / "full"), str(root / "lora_r16")
  shutil.copytree(os.path.join(FIXTURES, "full"), full)
  shutil.copytree(os.path.join(FIXTURES, "lora_r16"), lora)
  rng = np.random.default_rng(0)
  base = _params(rng)
  ft = {l: {g: {m: {"kernel": v["kernel"] + (0.05 * rng.standard_normal(v["kernel"].shape))
                    .astype(np.float32)} for m, v in mods.items()} for g, mods in layer.items()}
        for l, layer in base.items()}
  res = analysis.analyze(base, ft, intruders=True, modules="q_proj,down_proj", progress=False)
  analysis.attach_random_baseline(res, n=100)
  analysis.save_analysis(res, os.path.join(full, "analysis"))
  lora_params = _params(np.random.default_rng(1), lora_rank=4)
  for l, layer in lora_params.items():  # frozen kernels = the base's
    for g, mods in layer.items():
      for m, mod in mods.items():
        mod["kernel"] = base[l][g][m]["kernel"]
  res = analysis.analyze(base, lora_params, finetuned_lora=LoraConfig(rank=4),
                         modules="q_proj,down_proj", intruders=True, progress=False)
  analysis.save_analysis(res, os.path.join(lora, "analysis"))
  return [full, lora]


def test_load_run_reads_every_source():
  full = runs_lib.load_run(os.path.join(FIXTURES, "full"))
  assert (full.label, full.method, full.rank, full.lr) == ("Full FT", "full", None, 5e-5)
  assert len(full.train) == 40 and full.analysis is None
  assert [e.step for e in full.evals] == [0, 10, 20, 30, 40]
  assert full.evals[2].epoch == 2.0  # eval JSONs get epochs from metrics.jsonl
  assert full.evals[1].scores["humaneval"] == 0.30
  lora = runs_lib.load_run(os.path.join(FIXTURES, "lora_r16"))
  assert (lora.label, lora.method, lora.rank, lora.lr) == ("LoRA r=16", "lora", 16, 2e-4)
  # eval lines: acc_norm preferred over acc; forgetting derived as the mean of the three tasks
  e = lora.evals[0]
  assert e.scores["hellaswag"] == 0.75
  assert e.forgetting == pytest.approx((0.75 + 0.46 + 0.73) / 3)
  assert runs_lib.pick_target([full, lora]) == "humaneval"
  assert runs_lib.pick_x_axis([full, lora]) == "epoch"
  xs, ys = lora.curve("loss", "tokens")
  assert len(xs) == 40 and ys[0] > ys[-1]


def test_eval_results_in_subdirectories(tmp_path):
  """`lora-jax eval --out <run>/evals/<name>` writes <name>/results.json; both layouts are read."""
  shutil.copytree(os.path.join(FIXTURES, "full"), tmp_path / "r")
  evals = tmp_path / "r" / "evals"
  (evals / "step_000020").mkdir()
  os.rename(evals / "step_000020.json", evals / "step_000020" / "results.json")
  run = runs_lib.load_run(str(tmp_path / "r"))
  assert [e.step for e in run.evals] == [0, 10, 20, 30, 40]
  assert run.evals[2].scores["humaneval"] == 0.46


def test_labels_are_made_unique(tmp_path):
  for name in ("a", "b"):
    shutil.copytree(os.path.join(FIXTURES, "full"), tmp_path / name)
  runs = runs_lib.load_runs([str(tmp_path / "a"), str(tmp_path / "b")])
  assert len({r.label for r in runs}) == 2


def test_truncated_metrics_line_is_skipped(tmp_path):
  shutil.copytree(os.path.join(FIXTURES, "lora_r16"), tmp_path / "r")
  with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
    f.write('{"step": 41, "tok')
  assert len(runs_lib.load_run(str(tmp_path / "r")).train) == 40


def _png_ok(path):
  img = mpimg.imread(path)
  assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
  assert img.std() > 0  # not a blank canvas


def test_plot_functions_write_pngs(tmp_path):
  paths = [
      report.plot_pareto({"Full FT": [(0.65, 0.1, "0ep"), (0.5, 0.4, "1ep")],
                          "LoRA": [(0.65, 0.1), (0.62, 0.3)]}, str(tmp_path / "p.png"),
                         xlabel="forgetting", ylabel="humaneval", base_point=(0.65, 0.1)),
      report.plot_learning_curves({"run": ([1, 2, 3], [3.0, 2.0, 1.5])}, str(tmp_path / "c.png")),
      report.plot_rank_by_layer({"q_proj": ([0, 1, 2], [10, 30, 12]),
                                 "down_proj": ([0, 1, 2], [20, 40, 25])}, str(tmp_path / "r.png")),
      report.plot_spectra({"a": np.linspace(3, 1, 50), "lora": np.r_[np.ones(4), np.zeros(46)]},
                          str(tmp_path / "s.png")),
      report.plot_intruders_by_layer({"q_proj": ([0, 1], [0, 3])}, str(tmp_path / "i.png")),
  ]
  for p in paths:
    _png_ok(p)
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # atomic writes cleaned up


def test_plot_analysis(run_dirs, tmp_path):
  res = analysis.load_analysis(os.path.join(run_dirs[0], "analysis"))
  paths = report.plot_analysis(res, str(tmp_path))
  assert sorted(paths) == ["intruders", "rank_by_layer", "spectra"]
  for p in paths.values():
    _png_ok(p)


def test_write_report_contains_every_figure(run_dirs, tmp_path):
  out = str(tmp_path / "report")
  result = report.write_report(run_dirs, out, random_n=100)
  text = open(result["report"]).read()
  names = {os.path.basename(p) for p in result["figures"]}
  assert names == {"loss.png", "target.png", "forgetting.png", "pareto.png",
                   "rank_by_layer.png", "spectra.png", "intruders.png",
                   "fig1_learning_vs_budget.png", "fig2_forgetting_vs_budget.png",
                   "fig3_learning_vs_forgetting.png", "fig5_diversity.png",
                   "fig6_rank_across_budgets.png", "figS9_passk.png"}
  refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
  assert sorted(refs) == sorted(f"figures/{n}" for n in names)
  for ref in refs:
    _png_ok(os.path.join(out, ref))
  assert result["target"] == "humaneval" and result["x_axis"] == "epoch"
  for needle in ("Full FT", "LoRA r=16", "## Learning vs forgetting", "## Spectral analysis",
                 "Random baseline", "rank@90%", "Intruder dimensions"):
    assert needle in text
  # the LoRA run's dW has rank <= 4 in every matrix: its mean rank cells say so
  lora_row = next(l for l in text.splitlines() if l.startswith("| LoRA r=16 |") and " / " in l)
  means = [float(c.split("/")[0]) for c in lora_row.split("|")[2:-1]]
  assert means and all(m <= 4 for m in means)


def test_write_report_without_analysis_or_evals(tmp_path):
  run = tmp_path / "bare"
  run.mkdir()
  (run / "metrics.jsonl").write_text('{"step": 1, "tokens": 10, "epoch": 0.1, "loss": 2.0}\n'
                                     '{"step": 2, "tokens": 20, "epoch": 0.2, "loss": 1.5}\n')
  result = report.write_report([str(run)], str(tmp_path / "out"))
  text = open(result["report"]).read()
  assert [os.path.basename(p) for p in result["figures"]] == ["loss.png"]
  assert "No run has an `analysis/` directory" in text and result["x_axis"] == "tokens"


def test_report_against_the_paper(run_dirs, tmp_path, monkeypatch):
  """Tiny runs shaped like code IFT (full FT, LoRA r=16; a regularized full FT and LoRA at other
  targets/ranks): every supported paper figure, the paper's reference series and the table."""
  from lora_jax.report import paper_figures
  extra = []
  for name, cfg in (("full_wd", {"method": "full", "lr": 5e-5, "regime": "ift",
                                 "weight_decay": 1e-4}),
                    ("lora_attn_r64", {"method": "lora", "rank": 64, "targets": "attention",
                                       "regime": "ift"})):
    d = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, "lora_r16"), d)
    os.remove(d / "config.json")
    (d / "run.json").write_text(json.dumps(cfg))
    extra.append(str(d))
  legends = {}
  save = paper_figures.plots.save_figure

  def record(fig, path):
    legends[os.path.basename(path)] = [t.get_text() for ax in fig.axes if ax.get_legend()
                                       for t in ax.get_legend().get_texts()]
    return save(fig, path)

  monkeypatch.setattr(paper_figures.plots, "save_figure", record)
  out = str(tmp_path / "report")
  result = report.write_report(run_dirs + extra, out, random_n=100)
  names = {os.path.basename(p) for p in result["figures"]}
  assert {"fig1_learning_vs_budget.png", "fig2_forgetting_vs_budget.png",
          "fig3_learning_vs_forgetting.png", "fig4_regularizers.png", "fig5_diversity.png",
          "fig6_rank_across_budgets.png", "fig7_targets_ranks.png", "figS9_passk.png"} <= names
  for n in names:
    _png_ok(os.path.join(out, "figures", n))
  # the paper's series for the two matched settings, and none for the unmatched runs
  fig1 = legends["fig1_learning_vs_budget.png"]
  assert "paper code ift, full FT (Table S5)" in fig1
  assert "paper code ift, LoRA r=16 (Table S5)" in fig1
  assert sum(l.startswith("paper") for l in fig1) == 2
  assert "paper code ift, LoRA r=16 (Table S6)" in legends["fig2_forgetting_vs_budget.png"]
  text = open(result["report"]).read()
  table = text[text.index("### This run vs the paper"):].splitlines()
  rows = [l.split(" | ") for l in table if l.startswith("| ") and " | paper code ift" in l]
  assert not any("[full_wd]" in r[0] or "attention" in r[0] for r in rows)  # unmatched runs
  # full FT at 1, 2, 4 epochs (the fixture evaluates epochs 1-4), learning and forgetting
  full = {(r[2], r[3]): (float(r[4]), float(r[5])) for r in rows
          if r[1] == "paper code ift, full FT"}
  assert full[("1 ep", "learning (humaneval)")] == (0.30, 0.302)  # Table S5
  assert full[("4 ep", "forgetting")][1] == 0.512  # Table S6
  assert ("3 ep", "learning (humaneval)") not in full  # no paper column at 3 epochs
  assert len(full) == 6
  lora = {(r[2], r[3]): float(r[5]) for r in rows if r[1] == "paper code ift, LoRA r=16"}
  assert lora[("2 ep", "learning (humaneval)")] == 0.275 and len(lora) == 6
  assert "weight decay 0.0001" in text and "Tables S1-S8" in text


def test_paper_tables_are_complete():
  from lora_jax.report import paper_tables as pt
  assert sorted(pt.TABLES) == [f"S{i}" for i in range(1, 9)]
  for table, (regime, quantity, values) in pt.TABLES.items():
    assert set(values) == set(pt.METHODS)
    assert all(len(v) == len(pt.budgets(regime)) for v in values.values()), table
  assert pt.series("math_cpt", "learning", "full")[1][-1] == 0.293
  assert len(pt.CPT_TOKENS) == 8 and 10e9 not in pt.CPT_TOKENS


def test_paper_match_for_cpt_budgets_and_methods():
  from lora_jax.report import paper
  from lora_jax.report.runs import EvalPoint, Run

  def run(method, rank=None, targets="all", **cfg):
    return Run("p", "x", method, rank, targets, 1e-5, [], [], None,
               {"data": {"regime": "cpt"}, **cfg})

  m = paper.match(run("lora", 256), "gsm8k")
  assert (m.regime, m.method, m.label) == ("math_cpt", "lora_r256", "paper math cpt, LoRA r=256")
  assert paper.budget_index(m, 2.0e9, None) == 3 and paper.budget_index(m, 2.1e9, None) is None
  assert paper.budget_index(m, 0.25e9 * 1.01, None) == 0  # 318 steps x 786,432 tokens
  assert paper.match(run("lora", 8), "gsm8k") is None  # the paper has no r=8
  assert paper.match(run("lora", 16, "attention"), "gsm8k") is None
  assert paper.match(run("lora", 16, lora={"alpha": 32.0}), "gsm8k") is not None
  assert paper.match(run("lora", 16, lora={"alpha": 16.0}), "gsm8k") is None  # alpha != 2r
  assert paper.match(run("full", optimizer={"weight_decay": 1e-6}), "humaneval").regime == (
      "code_cpt")  # the paper's own code CPT weight decay
  assert paper.match(run("full", model={"attention_dropout": 0.1}), "humaneval") is None
  assert paper.match(run("full"), "hellaswag") is None
  r = run("full")
  r.evals = [EvalPoint(5087, 4e9, None, {"gsm8k": 0.25, "forgetting": 0.6})]
  rows = paper.comparison_rows([r], "gsm8k")
  assert [(x[2], x[3], x[5], x[7]) for x in rows] == [
      ("4B tokens", "learning (gsm8k)", 0.224, "S3"), ("4B tokens", "forgetting", 0.629, "S4")]


def test_report_cli_no_paper(tmp_path, capsys):
  from lora_jax import cli
  out = str(tmp_path / "r")
  assert cli.main(["report", "--runs", os.path.join(FIXTURES, "full"), "--out", out,
                   "--no-paper"]) == 0
  text = open(os.path.join(out, "report.md")).read()
  assert "## Against the paper" not in text and "## Learning vs forgetting" in text
