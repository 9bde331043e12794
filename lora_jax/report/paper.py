"""Runs set against the paper: which paper setting a run reproduces, and the differences.

A run matches a paper setting when its regime is known (config `data.regime` "cpt" / "ift", or a
run.json `regime`), its learning task is HumanEval (code) or GSM8K (math), and its method is one
the paper tabulates: full finetuning, or LoRA r in {16, 64, 256} on all modules with alpha = 2r,
without the regularizers of Fig. 4 (weight decay above the paper's 1e-6, attention dropout).
An eval point compares with a table column when its tokens are within 2% of a CPT budget or its
epoch is an IFT epoch count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from lora_jax.report import paper_tables as pt
from lora_jax.report.runs import FORGETTING, Run

DOMAIN = {"humaneval": "code", "gsm8k": "math"}
PAPER_WEIGHT_DECAY = 1e-6  # the largest the paper's main runs used (code CPT)


def config_value(run: Run, dotted: str, flat: str | None = None) -> Any:
  """A value of the run's config.json (dotted key) or its run.json (`flat` key)."""
  if flat and flat in run.config:
    return run.config[flat]
  node: Any = run.config
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def regularizer(run: Run) -> str | None:
  """"weight decay X" / "attention dropout Y" for a Fig. 4 regularizer run, else None."""
  wd = config_value(run, "optimizer.weight_decay", "weight_decay") or 0.0
  drop = config_value(run, "model.attention_dropout", "attn_dropout") or 0.0
  if drop:
    return f"attention dropout {drop:g}"
  if wd > PAPER_WEIGHT_DECAY:
    return f"weight decay {wd:g}"
  return None


def paper_method(run: Run) -> str | None:
  """"full" / "lora_r16" / "lora_r64" / "lora_r256" when the run is one the paper tabulates."""
  if regularizer(run) is not None:
    return None
  if run.method == "full":
    return "full"
  alpha = config_value(run, "lora.alpha", "alpha")
  if (run.method == "lora" and run.rank in (16, 64, 256)
      and str(run.targets or "all").lower() in ("all", "all_linear")
      and (not alpha or float(alpha) == 2 * run.rank)):
    return f"lora_r{run.rank}"
  return None


def paper_regime(run: Run, target: str | None) -> str | None:
  """"code_cpt" / "math_cpt" / "code_ift" / "math_ift", or None when unknown."""
  kind = config_value(run, "data.regime", "regime")
  if isinstance(kind, str) and kind in pt.LEARNING_TASK:
    return kind
  if kind not in ("cpt", "ift") or DOMAIN.get(target or "") is None:
    return None
  return f"{DOMAIN[target]}_{kind}"


@dataclasses.dataclass
class Match:
  regime: str
  method: str

  @property
  def label(self) -> str:
    method = "full FT" if self.method == "full" else f"LoRA r={self.method[len('lora_r'):]}"
    return f"paper {self.regime.replace('_', ' ')}, {method}"

  @property
  def is_cpt(self) -> bool:
    return self.regime.endswith("cpt")


def match(run: Run, target: str | None) -> Match | None:
  regime, method = paper_regime(run, target), paper_method(run)
  if regime is None or method is None or pt.LEARNING_TASK[regime] != target:
    return None
  return Match(regime, method)


def budget_index(m: Match, tokens: float | None, epoch: float | None) -> int | None:
  """The table column of an eval point, or None when it falls on none."""
  for i, b in enumerate(pt.budgets(m.regime)):
    if m.is_cpt and tokens and abs(tokens - b) <= 0.02 * b:
      return i
    if not m.is_cpt and epoch is not None and abs(epoch - b) < 1e-6:
      return i
  return None


def budget_text(m: Match, i: int) -> str:
  b = pt.budgets(m.regime)[i]
  return f"{b / 1e9:g}B tokens" if m.is_cpt else f"{b:g} ep"


def comparison_rows(runs: Sequence[Run], target: str | None) -> list[list]:
  """[run, paper setting, budget, quantity, this run, paper, difference, table] per eval point
  that falls on a paper column."""
  rows = []
  for run in runs:
    m = match(run, target)
    if m is None:
      continue
    for e in run.evals:
      i = budget_index(m, e.tokens, e.epoch)
      if i is None:
        continue
      for quantity, task in (("learning", target), ("forgetting", FORGETTING)):
        ours = e.scores.get(task)
        if ours is None:
          continue
        ref = pt.series(m.regime, quantity, m.method)[1][i]
        what = f"learning ({task})" if quantity == "learning" else "forgetting"
        rows.append([run.label, m.label, budget_text(m, i), what, ours, ref,
                     ours - ref, pt.table_name(m.regime, quantity)])
  return rows
