"""Reading run directories for reports.

A run directory (a local path or gs://...) holds
  metrics.jsonl      training lines {"step", "tokens", "epoch", "loss", "lr", ...} and eval lines
                     {"step", "tokens", "epoch", "eval": {task: {metric: value}}}
  evals/*.json       optional, one per checkpoint (or evals/<name>/results.json, as `lora-jax
                     eval --out` writes): {"model", "adapter", "step", "tokens",
                     "results": [{"task", "metric", "value", ...}], "headline": {task: value}}
  run.json           optional flat summary {"method": "full"|"lora", "rank", "targets", "lr", "label"}
  config.json        optional full run config (lora.enabled, lora.rank, lora.targets, optimizer.lr)
  analysis/          optional `lora-jax analyze` output (analysis.json + spectra.npz)

`load_run(path)` returns a `Run` with the training lines, the eval points in training order
(evals/*.json win over metrics.jsonl eval lines of the same step) and the analysis if present.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from typing import Any, Iterable, Sequence

from lora_jax import fileio
from lora_jax.analysis.analyze import Analysis
from lora_jax.analysis.io import ANALYSIS_FILE, load_analysis

FORGETTING = "forgetting"
FORGETTING_TASKS = ("hellaswag", "arc_challenge", "winogrande")
# Which metric stands for a task when an eval line gives several (first match wins).
METRIC_PRIORITY = ("pass@1", "strict_match", "exact_match", "acc_norm", "acc", "accuracy", "score")


@dataclasses.dataclass
class EvalPoint:
  step: int | None
  tokens: int | None
  epoch: float | None
  scores: dict[str, float]  # task -> headline value (plus derived "forgetting")
  metrics: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # every metric

  @property
  def forgetting(self) -> float | None:
    return self.scores.get(FORGETTING)


@dataclasses.dataclass
class Run:
  path: str
  label: str
  method: str | None  # "full" | "lora" | None (unknown)
  rank: int | None
  targets: str | None
  lr: float | None
  train: list[dict]
  evals: list[EvalPoint]
  analysis: Analysis | None
  config: dict

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.path))

  def curve(self, key: str, x: str = "tokens") -> tuple[list[float], list[float]]:
    """(xs, ys) of a training-line field (e.g. "loss") against "tokens", "step" or "epoch"."""
    pts = [(r[x], r[key]) for r in self.train if _num(r.get(x)) and _num(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]

  def eval_curve(self, task: str, x: str = "tokens") -> tuple[list[float], list[float]]:
    pts = [(getattr(e, x), e.scores[task]) for e in self.evals
           if task in e.scores and _num(getattr(e, x))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _num(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pick_metric(metrics: dict[str, Any]) -> float | None:
  """The headline value among {metric: value}: by METRIC_PRIORITY, else the only/first number."""
  if _num(metrics):
    return float(metrics)
  if not isinstance(metrics, dict):
    return None
  for m in METRIC_PRIORITY:
    if _num(metrics.get(m)):
      return float(metrics[m])
  nums = [v for k, v in metrics.items() if _num(v) and not k.endswith("stderr")]
  return float(nums[0]) if nums else None


def with_forgetting(scores: dict[str, float]) -> dict[str, float]:
  """Adds "forgetting" = mean(hellaswag, arc_challenge, winogrande) when all three are there."""
  if FORGETTING not in scores and all(t in scores for t in FORGETTING_TASKS):
    scores = dict(scores, **{FORGETTING: sum(scores[t] for t in FORGETTING_TASKS) / 3})
  return scores


def read_jsonl(path: str) -> list[dict]:
  """JSON lines; a truncated last line (a run still writing) is skipped, other bad lines raise."""
  out = []
  lines = fileio.read_text(path).splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        break
      raise ValueError(f"{path}:{i + 1}: not JSON ({e})") from None
  return out


def _eval_json_point(doc: dict) -> EvalPoint:
  scores: dict[str, float] = {}
  results = [r for r in doc.get("results", []) if _num(r.get("value")) and r.get("task")]
  is_headline = lambda r: r.get("metric") == (r.get("settings") or {}).get("headline_metric")
  for r in sorted(results, key=lambda r: not is_headline(r)):  # headline metrics first
    scores.setdefault(r["task"], float(r["value"]))
  for task, value in (doc.get("headline") or {}).items():
    if _num(value):
      scores[task] = float(value)
  metrics: dict[str, dict[str, float]] = {}
  for r in results:
    metrics.setdefault(r["task"], {})[str(r.get("metric"))] = float(r["value"])
  return EvalPoint(doc.get("step"), doc.get("tokens"), doc.get("epoch"), with_forgetting(scores),
                   metrics)


def _describe(cfg: dict) -> tuple[str | None, int | None, str | None, float | None, str | None]:
  """(method, rank, targets, lr, label) from run.json (flat) or config.json (nested run config)."""
  lora = cfg.get("lora") if isinstance(cfg.get("lora"), dict) else None
  method = cfg.get("method")
  if method is None and lora is not None and "enabled" in lora:
    method = "lora" if lora["enabled"] else "full"
  rank = cfg.get("rank", (lora or {}).get("rank"))
  targets = cfg.get("targets", (lora or {}).get("targets"))
  lr = cfg.get("lr")
  if lr is None and isinstance(cfg.get("optimizer"), dict):
    lr = cfg["optimizer"].get("lr")
  if method == "full":
    rank, targets = None, None
  if isinstance(targets, (list, tuple)):
    targets = ",".join(targets)
  return method, rank, targets, lr, cfg.get("label")


def default_label(method, rank, targets) -> str | None:
  if method == "full":
    return "Full FT"
  if method == "lora":
    label = f"LoRA r={rank}" if rank else "LoRA"
    if targets and str(targets).lower() not in ("all", "all_linear"):
      label += f" ({targets})"
    return label
  return None


def load_run(path: str, label: str | None = None) -> Run:
  """Reads one run directory (see the module docstring); missing pieces are empty / None."""
  if not fileio.isdir(path):
    raise FileNotFoundError(f"{path}: run directory not found")
  cfg: dict = {}
  for name in ("config.json", "run.json"):  # run.json's flat fields override
    f = fileio.join(path, name)
    if fileio.isfile(f):
      cfg.update(fileio.read_json(f, "run config"))
  method, rank, targets, lr, cfg_label = _describe(cfg)
  metrics_file = fileio.join(path, "metrics.jsonl")
  lines = read_jsonl(metrics_file) if fileio.isfile(metrics_file) else []
  train = [r for r in lines if "eval" not in r]
  epoch_at = {r["step"]: r.get("epoch") for r in lines if "step" in r and _num(r.get("epoch"))}
  tokens_at = {r["step"]: r.get("tokens") for r in lines if "step" in r and _num(r.get("tokens"))}

  points: dict[Any, EvalPoint] = {}
  for r in lines:
    if isinstance(r.get("eval"), dict):
      scores = {t: v for t, m in r["eval"].items() if (v := pick_metric(m)) is not None}
      metrics = {t: {k: float(v) for k, v in m.items() if _num(v)}
                 for t, m in r["eval"].items() if isinstance(m, dict)}
      points[r.get("step")] = EvalPoint(r.get("step"), r.get("tokens"), r.get("epoch"),
                                        with_forgetting(scores), metrics)
  for f in eval_files(path):
    p = _eval_json_point(json.loads(fileio.read_text(f)))
    old = points.get(p.step)
    if old is not None:  # union of tasks; the eval JSON's values win
      p = EvalPoint(p.step, p.tokens if p.tokens is not None else old.tokens,
                    p.epoch if p.epoch is not None else old.epoch,
                    with_forgetting({**old.scores, **p.scores}),
                    {t: {**old.metrics.get(t, {}), **p.metrics.get(t, {})}
                     for t in {**old.metrics, **p.metrics}})
    points[p.step] = p
  evals = []
  for p in points.values():
    if p.epoch is None and p.step in epoch_at:
      p.epoch = epoch_at[p.step]
    if p.tokens is None and p.step in tokens_at:
      p.tokens = tokens_at[p.step]
    if p.step == 0 or (p.step is None and p.tokens in (None, 0)):
      p.step, p.tokens = 0, 0
      p.epoch = 0.0 if p.epoch is None else p.epoch
    evals.append(p)
  evals.sort(key=lambda e: (e.step if e.step is not None else -1, e.tokens or 0))

  analysis = None
  adir = fileio.join(path, "analysis")
  if fileio.isfile(fileio.join(adir, ANALYSIS_FILE)):
    analysis = load_analysis(adir)
  label = label or cfg_label or default_label(method, rank, targets) or os.path.basename(
      os.path.normpath(path))
  return Run(path, label, method, rank, targets, lr, train, evals, analysis, cfg)


def eval_files(path: str) -> list[str]:
  """evals/*.json and evals/*/results.json of a run dir (local or gs://), sorted; like glob, names
  starting with "." are skipped."""
  evals = fileio.join(path, "evals")
  if not fileio.isdir(evals):
    return []
  files = []
  for name in fileio.listdir(evals):
    if name.startswith("."):
      continue
    f = fileio.join(evals, name)
    if name.endswith(".json") and fileio.isfile(f):
      files.append(f)
    elif fileio.isfile(fileio.join(f, "results.json")):
      files.append(fileio.join(f, "results.json"))
  return sorted(files)


def load_runs(paths: Iterable[str]) -> list[Run]:
  """Loads runs and makes their labels unique (adding the learning rate, then the directory)."""
  runs = [load_run(p) for p in paths]
  for extra in (lambda r: f"lr={r.lr:g}" if r.lr is not None else None, lambda r: r.name):
    counts = Counter(r.label for r in runs)
    for r in runs:
      if counts[r.label] > 1 and (e := extra(r)) and e not in r.label:
        r.label = f"{r.label} [{e}]"
  return runs


def pick_target(runs: Sequence[Run]) -> str | None:
  """The learning task: the most frequent evaluated task that is not a forgetting task."""
  skip = set(FORGETTING_TASKS) | {FORGETTING}
  counts = Counter(t for r in runs for e in r.evals for t in e.scores if t not in skip)
  if not counts:
    return None
  return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def pick_x_axis(runs: Sequence[Run]) -> str:
  """"epoch" when every run with training lines went through its data at least once, else "tokens"."""
  epochs = [max((r["epoch"] for r in run.train if _num(r.get("epoch"))), default=None)
            for run in runs if run.train]
  if epochs and all(e is not None and e >= 1 for e in epochs):
    return "epoch"
  return "tokens"
