"""GSM8K: k-shot chain-of-thought prompts, greedy generation, strict and flexible answer match.

Prompt (lm-evaluation-harness `gsm8k`, v3): k solved train problems, each
"Question: {question}\\nAnswer: {answer}", joined and followed by "\\n\\n" and
"Question: {question}\\nAnswer:". Shots are drawn per problem with `random.Random(seed)` (lm-eval's
default seed 1234). Generation is greedy and stops at "Question:", "</s>" or "<|im_end|>".

Scoring: `strict_match` (the paper's metric) takes the first "#### <number>" of the generation;
`flexible_match` takes the last number-like string. Both sides are normalized: commas, "$" and a
trailing "." removed, then "5.0" / "5.00" read as "5" (lm-eval compares strings after the same
removals, without the last step).
"""

from __future__ import annotations

import dataclasses
import random
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Sequence

from lora_jax.data.errors import DataError
from lora_jax.evals.results import entry
from lora_jax.evals import task_data
from lora_jax.evals.task_data import FORMATS, field

TASK = "gsm8k"
STOP = ("Question:", "</s>", "<|im_end|>")
STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
INVALID = "[invalid]"
DEFAULT_SEED = 1234
DEFAULT_FEWSHOT = 5


@dataclasses.dataclass(frozen=True)
class Problem:
  question: str
  target: str   # the full solution text used in shots, ending in "#### <answer>"
  answer: str   # normalized gold number
  where: str


def parse_problems(rows: Sequence[dict]) -> list[Problem]:
  """HF rows {question, answer} or Gauntlet rows {context, chain_of_thought, answer}."""
  out = []
  fmt = FORMATS[TASK]
  for row in rows:
    where = row.get("_where", "?")
    if "question" in row:
      question = field(row, "question", str, fmt)
      target = field(row, "answer", str, fmt)
      if "####" not in target:
        raise DataError(where, f"answer has no '#### <number>' line; expected {fmt}")
      gold = target.split("####")[-1]
    elif "context" in row:
      question = field(row, "context", str, fmt).strip()
      if question.startswith("Question:"):  # Gauntlet files may carry the prelimiter already
        question = question[len("Question:"):].strip()
      cot = field(row, "chain_of_thought", str, fmt).strip()
      gold = str(field(row, "answer", (str, int, float), fmt))
      target = f"{cot}\n#### {gold.strip()}" if cot else f"#### {gold.strip()}"
    else:
      raise DataError(where, f"unrecognized row (keys {sorted(k for k in row if k != '_where')}); "
                      f"expected {fmt}")
    out.append(Problem(question.strip(), target.strip(), normalize_number(gold), where))
  return out


def normalize_number(text: str | None) -> str:
  """Commas, "$", surrounding space and a trailing "." removed; "5.0" -> "5"; lower-cased."""
  if text is None:
    return INVALID
  s = text.strip().replace(",", "").replace("$", "").strip()
  s = s.rstrip(".")
  try:
    d = Decimal(s)
  except InvalidOperation:
    return s.lower()
  if not d.is_finite():
    return s.lower()
  if d == d.to_integral_value():
    return str(int(d))
  return format(d.normalize(), "f")


def extract_strict(generation: str) -> str:
  m = STRICT_RE.search(generation)
  return m.group(1) if m else INVALID


def extract_flexible(generation: str) -> str:
  matches = FLEXIBLE_RE.findall(generation)
  if not matches:
    return INVALID
  last = matches[-1]
  return next((g for g in last if g), INVALID)


def shot_text(p: Problem) -> str:
  return f"Question: {p.question}\nAnswer: {p.target}"


def build_prompt(problem: Problem, shots: Sequence[Problem]) -> str:
  query = f"Question: {problem.question}\nAnswer:"
  if not shots:
    return query
  return "\n\n".join(shot_text(s) for s in shots) + "\n\n" + query


def sample_shots(pool: Sequence[Any], k: int, rng: random.Random,
                 exclude: int | None = None) -> list[Any]:
  """k items of `pool` without replacement; `exclude` (an index) is never chosen."""
  if k <= 0:
    return []
  n_avail = len(pool) - (exclude is not None)
  if k > n_avail:
    raise ValueError(f"num_fewshot={k} but the few-shot pool has only {n_avail} examples")
  idx = rng.sample(range(len(pool)), k + (exclude is not None))
  return [pool[i] for i in idx if i != exclude][:k]


def evaluate_gsm8k(generate_fn: Callable[..., list[list[str]]], problems: Sequence[Problem],
                   shot_pool: Sequence[Problem] | None = None, *,
                   num_fewshot: int = DEFAULT_FEWSHOT,
                   seed: int = DEFAULT_SEED, max_new_tokens: int = 256,
                   limit: int | None = None, stop: Sequence[str] = STOP,
                   source: str = "") -> tuple[list[dict], list[dict]]:
  """(result entries, per-sample rows). Without `shot_pool`, shots come from `problems` itself."""
  problems = list(problems)
  same_pool = shot_pool is None
  pool = problems if same_pool else list(shot_pool)
  if limit is not None:
    problems = problems[:limit]
  rng = random.Random(seed)
  prompts = [build_prompt(p, sample_shots(pool, num_fewshot, rng, i if same_pool else None))
             for i, p in enumerate(problems)]
  outs = task_data.check_generations(
      generate_fn(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                  stop=list(stop), seed=seed), prompts, 1)
  rows, strict, flexible = [], [], []
  for i, (p, prompt, gens) in enumerate(zip(problems, prompts, outs)):
    gen = gens[0]
    s_raw, f_raw = extract_strict(gen), extract_flexible(gen)
    s_pred = normalize_number(s_raw) if s_raw != INVALID else INVALID
    f_pred = normalize_number(f_raw) if f_raw != INVALID else INVALID
    strict.append(float(s_pred == p.answer))
    flexible.append(float(f_pred == p.answer))
    rows.append({"doc_id": i, "where": p.where, "question": p.question, "prompt": prompt,
                 "generation": gen, "gold": p.answer, "strict_pred": s_pred,
                 "flexible_pred": f_pred, "strict_match": strict[-1],
                 "flexible_match": flexible[-1]})
  settings = {"num_fewshot": num_fewshot, "fewshot_seed": seed, "greedy": True,
              "max_new_tokens": max_new_tokens, "stop": list(stop),
              "fewshot_source": ("eval split (excluding the problem)" if same_pool
                                 else "train split"),
              "prompt_format": "lm-eval gsm8k: Question: ...\\nAnswer: ...", "source": source,
              "headline_metric": "strict_match"}
  entries = [entry(TASK, "strict_match", strict, settings),
             entry(TASK, "flexible_match", flexible, settings)]
  return entries, rows
