"""Eval result entries, the results JSON and per-sample jsonl, written atomically.

Results JSON (read by the report and the demo):

  {"model": str, "adapter": str | null, "step": int | null, "tokens": int | null,
   "results": [{"task", "metric", "value", "stderr", "n", "settings": {...}}, ...],
   "headline": {task: value},
   "bos": {"add_bos": bool, "source": "tokenizer" | "--bos/--no-bos", "tokenizer_add_bos": bool}}

`bos` (written by `runner.run_evals`) says whether requests started with BOS and why.
`settings["headline_metric"]` names the metric that is the task's headline. `forgetting` is
derived: the mean of the hellaswag, arc_challenge and winogrande headline accuracies (stderr from
the three stderrs as if independent: sqrt(sum se^2) / 3). Per-sample rows go to
`<out>/samples_<task>.jsonl`.
"""

from __future__ import annotations

import json
import math
from typing import Iterable, Mapping, Sequence

from lora_jax import fileio
from lora_jax.fileio import atomic_write_json, atomic_write_text, dumps

FORGETTING_TASKS = ("hellaswag", "arc_challenge", "winogrande")
RESULTS_FILE = "results.json"


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
  """Mean and standard error: sample std (ddof=1) / sqrt(n); 0.0 with fewer than 2 values."""
  n = len(values)
  if n == 0:
    return float("nan"), float("nan")
  mean = sum(values) / n
  if n < 2:
    return mean, 0.0
  var = sum((v - mean) ** 2 for v in values) / (n - 1)
  return mean, math.sqrt(var / n)


def entry(task: str, metric: str, values: Sequence[float], settings: Mapping) -> dict:
  mean, se = mean_stderr([float(v) for v in values])
  return {"task": task, "metric": metric, "value": mean, "stderr": se, "n": len(values),
          "settings": dict(settings)}


def headline_entry(entries: Iterable[Mapping], task: str) -> Mapping | None:
  for e in entries:
    if e["task"] == task and e["metric"] == e.get("settings", {}).get("headline_metric"):
      return e
  return None


def forgetting_entry(entries: Sequence[Mapping]) -> dict:
  """Mean of the FORGETTING_TASKS headline accuracies; error if one is missing."""
  parts = {t: headline_entry(entries, t) for t in FORGETTING_TASKS}
  missing = [t for t, e in parts.items() if e is None]
  if missing:
    raise ValueError(f"forgetting needs headline results for {list(FORGETTING_TASKS)}; "
                     f"missing {missing}")
  values = [parts[t]["value"] for t in FORGETTING_TASKS]
  se = math.sqrt(sum(parts[t]["stderr"] ** 2 for t in FORGETTING_TASKS)) / len(values)
  return {"task": "forgetting", "metric": "acc", "value": sum(values) / len(values),
          "stderr": se, "n": sum(parts[t]["n"] for t in FORGETTING_TASKS),
          "settings": {"headline_metric": "acc", "components": {
              t: {"metric": parts[t]["metric"], "value": parts[t]["value"],
                  "num_fewshot": parts[t]["settings"].get("num_fewshot")}
              for t in FORGETTING_TASKS}}}


def build_results(entries: Sequence[Mapping], *, model: str, adapter: str | None = None,
                  step: int | None = None, tokens: int | None = None) -> dict:
  headline = {}
  for e in entries:
    if e["metric"] == e.get("settings", {}).get("headline_metric") and e["task"] not in headline:
      headline[e["task"]] = e["value"]
  return {"model": model, "adapter": adapter, "step": step, "tokens": tokens,
          "results": [dict(e) for e in entries], "headline": headline}


def write_results(out_dir: str, results: Mapping) -> str:
  path = fileio.join(out_dir, RESULTS_FILE)
  atomic_write_json(path, results, indent=2)
  return path


def write_samples(out_dir: str, task: str, rows: Iterable[Mapping]) -> str:
  path = fileio.join(out_dir, f"samples_{task}.jsonl")
  atomic_write_text(path, "".join(dumps(r) + "\n" for r in rows))
  return path


def read_results(path: str) -> dict:
  """A results JSON (a file, or a directory holding results.json), checked for the contract keys."""
  if fileio.isdir(path):
    path = fileio.join(path, RESULTS_FILE)
  obj = json.loads(fileio.read_bytes(path).decode("utf-8"))
  for key in ("model", "results", "headline"):
    if key not in obj:
      raise ValueError(f"{path}: not a lora-jax results file (missing {key!r})")
  return obj


def format_table(results: Mapping) -> str:
  """A small plain-text table of every entry, headline metrics marked with '*'."""
  lines = [f"{'task':<15}{'metric':<20}{'value':>9}{'stderr':>9}{'n':>7}"]
  for e in results["results"]:
    mark = "*" if e["metric"] == e.get("settings", {}).get("headline_metric") else " "
    lines.append(f"{e['task']:<15}{e['metric'] + mark:<20}{e['value']:>9.4f}"
                 f"{e['stderr']:>9.4f}{e['n']:>7}")
  return "\n".join(lines)
