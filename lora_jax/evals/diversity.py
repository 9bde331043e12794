"""Diversity of sampled completions (the paper's "unique generations" figure).

For every problem we count the *unique* completions among its n samples, separately for passing
and failing ones (and for all of them). Two completions are the same when they are equal after
`normalize_completion`: trailing whitespace is stripped (a completion that ends in "\n" and one
that ends in "\n\n" before a stop sequence are the same program); nothing else is changed, so
differences in indentation, comments or names inside the code count as different strings.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from lora_jax.evals.passk import mean_and_stderr

GROUPS = ("passing", "failing", "all")


def normalize_completion(completion: str) -> str:
  """The string compared for uniqueness: the completion with trailing whitespace removed."""
  return completion.rstrip()


def unique_counts(rows: Iterable[Mapping]) -> dict[str, dict[str, dict[str, int]]]:
  """Per-problem counts from per-sample rows (`task_id`, `completion`, `passed`).

  Returns {task_id: {"passing"|"failing"|"all": {"unique": u, "total": t}}}, problems in first-seen
  order. A problem without passing samples has passing = {"unique": 0, "total": 0}.
  """
  seen: dict[str, dict[str, list[str]]] = {}
  for row in rows:
    groups = seen.setdefault(row["task_id"], {g: [] for g in GROUPS})
    text = normalize_completion(row["completion"])
    groups["passing" if row["passed"] else "failing"].append(text)
    groups["all"].append(text)
  return {tid: {g: {"unique": len(set(texts)), "total": len(texts)} for g, texts in groups.items()}
          for tid, groups in seen.items()}


def diversity_entries(rows: Iterable[Mapping], *, task: str = "humaneval", n: int | None = None,
                      settings: Mapping | None = None) -> list[dict]:
  """Result entries `unique_passing`, `unique_failing`, `unique_all`.

  `value` is the mean over problems of the per-problem unique count (problems with no sample in the
  group count as 0), `stderr` its standard error; `per_problem` holds {task_id: {"unique", "total"}}
  so the per-problem figure (unique vs. total, passing and failing side by side) can be drawn.
  """
  counts = unique_counts(rows)
  if n is None:
    n = max((c["all"]["total"] for c in counts.values()), default=0)
  entries = []
  for group in GROUPS:
    per_problem = {tid: dict(c[group]) for tid, c in counts.items()}
    value, stderr = mean_and_stderr([p["unique"] for p in per_problem.values()])
    entries.append({
        "task": task, "metric": f"unique_{group}", "value": value, "stderr": stderr, "n": n,
        "settings": dict(settings or {}), "num_problems": len(per_problem),
        "per_problem": per_problem,
    })
  return entries
