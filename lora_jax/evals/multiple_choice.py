"""Multiple-choice tasks scored by log-likelihood: HellaSwag, ARC-Challenge/Easy, WinoGrande, PIQA.

Each example becomes one (context, continuation) request per choice (`lora_jax.evals.scoring`).
Formats follow lm-evaluation-harness for HF rows, and the MosaicML Gauntlet for its local jsonl:

  hellaswag   ctx = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()),
              continuation " " + preprocess(ending); preprocess strips, turns " [title]" into
              ". ", drops bracketed text and double spaces
  arc_*       "Question: {question}\\nAnswer:" + " {choice}"
  piqa        "Question: {goal}\\nAnswer:" + " {sol}"
  winogrande  partial scoring: the sentence up to "_" with each option filled in is the context,
              the shared rest of the sentence (" " + text after "_") is the continuation
  Gauntlet    {query, choices, gold}: query + delimiter ("\\nAnswer: " for arc / piqa, " "
              otherwise) + choice; {context_options, continuation, gold}: option + " " + rest

Few-shot examples (the gold context + continuation of other docs) are joined with "\\n\\n"
(lm-eval; "\\n" for Gauntlet rows) and drawn per example with `random.Random(seed)`.

Metrics, all reported; `settings.headline_metric` names the headline:
  acc            argmax of the summed log-probability
  acc_norm       argmax of log-probability / len(choice text in characters)  (lm-eval acc_norm)
  acc_per_token  argmax of the mean log-probability per continuation token    (Gauntlet v0.3)
Default headlines: acc_norm for hellaswag, arc and piqa (lm-eval's reported number, length
normalized as in the paper); acc for winogrande, whose choices share one continuation, so length
normalization has nothing to correct.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, Sequence

import numpy as np

from lora_jax.data.errors import DataError
from lora_jax.evals.gsm8k import sample_shots
from lora_jax.evals.results import entry
from lora_jax.evals.task_data import FORMATS, field

TASKS = ("hellaswag", "arc_challenge", "arc_easy", "winogrande", "piqa")
METRICS = ("acc", "acc_norm", "acc_per_token")
DEFAULT_FEWSHOT = {"hellaswag": 0, "arc_challenge": 3, "arc_easy": 3, "winogrande": 5, "piqa": 0}
DEFAULT_HEADLINE = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm", "arc_easy": "acc_norm",
                    "winogrande": "acc", "piqa": "acc_norm"}
GAUNTLET_DELIMITER = {"hellaswag": " ", "arc_challenge": "\nAnswer: ", "arc_easy": "\nAnswer: ",
                      "winogrande": " ", "piqa": "\nAnswer: "}
DEFAULT_SEED = 1234


@dataclasses.dataclass(frozen=True)
class MCDoc:
  contexts: tuple[str, ...]       # one per choice (identical unless partial scoring)
  continuations: tuple[str, ...]  # one per choice (identical for partial scoring)
  choice_texts: tuple[str, ...]   # lm-eval's "choices": their lengths normalize acc_norm
  gold: int
  fewshot_delimiter: str
  where: str

  def shot(self) -> str:
    return self.contexts[self.gold] + self.continuations[self.gold]


# --------------------------------------------------------------------------- preprocessing
def hellaswag_preprocess(text: str) -> str:
  """lm-eval's HellaSwag cleanup (WikiHow artifacts)."""
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def winogrande_split(sentence: str, option: str) -> tuple[str, str]:
  """(partial context with `option` in place of "_", shared continuation after "_")."""
  i = sentence.index("_")
  return sentence[:i] + option, " " + sentence[i + 1:].strip()


def _gold(row: dict, key: str, n: int, fmt: str) -> int:
  value = field(row, key, (int, str), fmt)
  try:
    gold = int(value)
  except ValueError:
    raise DataError(row["_where"], f"{key}={value!r} is not an integer index; expected {fmt}") \
        from None
  if not 0 <= gold < n:
    raise DataError(row["_where"], f"{key}={gold} is out of range for {n} choices")
  return gold


def _str_list(row: dict, key: str, fmt: str, n: int | None = None) -> list[str]:
  value = field(row, key, (list, tuple), fmt)
  if not value or not all(isinstance(v, str) for v in value) or (n and len(value) != n):
    want = f"{n} strings" if n else "a non-empty list of strings"
    raise DataError(row["_where"], f"field {key!r} must be {want}; expected {fmt}")
  return list(value)


def _mc(row, contexts, continuations, choice_texts, gold, delim) -> MCDoc:
  n = len(choice_texts)
  contexts = contexts if isinstance(contexts, list) else [contexts] * n
  continuations = continuations if isinstance(continuations, list) else [continuations] * n
  return MCDoc(tuple(contexts), tuple(continuations), tuple(choice_texts), gold, delim,
               row.get("_where", "?"))


def parse_docs(task: str, rows: Sequence[dict]) -> list[MCDoc]:
  """HF-format or Gauntlet-format rows of `task` -> MCDocs (format detected per row)."""
  if task not in TASKS:
    raise ValueError(f"unknown multiple-choice task {task!r}; choose from {TASKS}")
  return [_parse_row(task, row) for row in rows]


def _parse_row(task: str, row: dict) -> MCDoc:
  fmt = FORMATS[task]
  if "query" in row and "choices" in row and "gold" in row:  # Gauntlet multiple choice
    choices = [c.strip() for c in _str_list(row, "choices", fmt)]
    ctx = field(row, "query", str, fmt).strip() + GAUNTLET_DELIMITER[task]
    return _mc(row, ctx, choices, choices, _gold(row, "gold", len(choices), fmt), "\n")
  if "context_options" in row:  # Gauntlet schema (winogrande)
    options = [c.strip() for c in _str_list(row, "context_options", fmt)]
    cont = " " + field(row, "continuation", str, fmt).strip()
    return _mc(row, options, cont, options, _gold(row, "gold", len(options), fmt), "\n")
  if task == "hellaswag":
    endings = [hellaswag_preprocess(e) for e in _str_list(row, "endings", fmt)]
    label = field(row, "activity_label", str, fmt)
    if "ctx_a" in row:
      ctx = field(row, "ctx_a", str, fmt) + " " + field(row, "ctx_b", str, fmt).capitalize()
    else:
      ctx = field(row, "ctx", str, fmt)
    query = hellaswag_preprocess(label + ": " + ctx)
    return _mc(row, query, [" " + e for e in endings], endings,
               _gold(row, "label", len(endings), fmt), "\n\n")
  if task in ("arc_challenge", "arc_easy"):
    choices = field(row, "choices", dict, fmt)
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) \
        or not texts:
      raise DataError(row["_where"], f"choices must hold equal-length 'text' and 'label' lists; "
                      f"expected {fmt}")
    key = str(field(row, "answerKey", (str, int), fmt))
    if key not in [str(x) for x in labels]:
      raise DataError(row["_where"], f"answerKey {key!r} is not one of the labels {labels}")
    ctx = f"Question: {field(row, 'question', str, fmt)}\nAnswer:"
    return _mc(row, ctx, [" " + t for t in texts], list(texts),
               [str(x) for x in labels].index(key), "\n\n")
  if task == "piqa":
    sols = [field(row, "sol1", str, fmt), field(row, "sol2", str, fmt)]
    ctx = f"Question: {field(row, 'goal', str, fmt)}\nAnswer:"
    return _mc(row, ctx, [" " + s for s in sols], sols, _gold(row, "label", 2, fmt), "\n\n")
  # winogrande
  sentence = field(row, "sentence", str, fmt)
  if sentence.count("_") != 1:
    raise DataError(row["_where"], f"sentence must contain exactly one '_', got {sentence!r}")
  options = [field(row, "option1", str, fmt), field(row, "option2", str, fmt)]
  answer = str(field(row, "answer", (str, int), fmt))
  if answer not in ("1", "2"):
    raise DataError(row["_where"], f"answer must be '1' or '2', got {answer!r}")
  parts = [winogrande_split(sentence, o) for o in options]
  return _mc(row, [p[0] for p in parts], [p[1] for p in parts], [p[0] for p in parts],
             int(answer) - 1, "\n\n")


# --------------------------------------------------------------------------- evaluation
def build_requests(docs: Sequence[MCDoc], pool: Sequence[MCDoc], num_fewshot: int, seed: int,
                   exclude_self: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
  """(per-doc few-shot prefix, flat (context, continuation) requests: docs x choices).

  With `exclude_self`, `docs` is a prefix of `pool` and doc i never gets pool[i] as a shot.
  """
  rng = random.Random(seed)
  prefixes, requests = [], []
  for i, d in enumerate(docs):
    shots = sample_shots(pool, num_fewshot, rng, i if exclude_self else None)
    prefix = "".join(s.shot() + d.fewshot_delimiter for s in shots)
    prefixes.append(prefix)
    requests.extend((prefix + c, x) for c, x in zip(d.contexts, d.continuations))
  return prefixes, requests


def choose(logprobs: Sequence[float], n_tokens: Sequence[int], choice_texts: Sequence[str]) -> dict:
  """Predicted index under each metric (ties -> first, as numpy argmax)."""
  lp = np.asarray(logprobs, np.float64)
  chars = np.asarray([max(len(t), 1) for t in choice_texts], np.float64)
  toks = np.asarray([max(n, 1) for n in n_tokens], np.float64)
  return {"acc": int(np.argmax(lp)), "acc_norm": int(np.argmax(lp / chars)),
          "acc_per_token": int(np.argmax(lp / toks))}


def evaluate_multiple_choice(task: str, scorer: Any, docs: Sequence[MCDoc],
                             shot_pool: Sequence[MCDoc] | None = None, *,
                             num_fewshot: int | None = None, seed: int = DEFAULT_SEED,
                             limit: int | None = None, headline: str | None = None,
                             progress: Any = None,
                             source: str = "") -> tuple[list[dict], list[dict]]:
  """(result entries for METRICS, per-sample rows). `scorer` is a `scoring.Scorer`."""
  num_fewshot = DEFAULT_FEWSHOT[task] if num_fewshot is None else int(num_fewshot)
  headline = headline or DEFAULT_HEADLINE[task]
  if headline not in METRICS:
    raise ValueError(f"headline metric {headline!r} not in {METRICS}")
  docs = list(docs)
  same_pool = shot_pool is None
  pool = docs if same_pool else list(shot_pool)
  if limit is not None:
    docs = docs[:limit]
  # Shots are drawn from the full pool, so --limit N scores the first N docs exactly as a full run.
  prefixes, requests = build_requests(docs, pool, num_fewshot, seed, exclude_self=same_pool)
  scores = scorer.score(requests, progress=progress)
  rows, values = [], {m: [] for m in METRICS}
  k = 0
  for i, d in enumerate(docs):
    s = scores[k:k + len(d.contexts)]
    k += len(d.contexts)
    preds = choose([x.logprob for x in s], [x.n_tokens for x in s], d.choice_texts)
    row = {"doc_id": i, "where": d.where, "gold": d.gold, "choices": list(d.choice_texts),
           "context": prefixes[i] + d.contexts[d.gold], "continuation": d.continuations[d.gold],
           "logprobs": [x.logprob for x in s], "n_tokens": [x.n_tokens for x in s],
           "is_greedy": [x.is_greedy for x in s]}
    for m in METRICS:
      values[m].append(float(preds[m] == d.gold))
      row[f"pred_{m}"] = preds[m]
      row[m] = values[m][-1]
    rows.append(row)
  settings = {"num_fewshot": num_fewshot, "fewshot_seed": seed, "headline_metric": headline,
              "fewshot_source": "eval split (excluding the doc)" if same_pool else "train split",
              "scoring": "log-likelihood; acc: sum, acc_norm: / characters (lm-eval), "
                         "acc_per_token: / tokens (Gauntlet v0.3)",
              "add_bos": getattr(scorer, "add_bos", None), "source": source}
  return [entry(task, m, values[m], settings) for m in METRICS], rows

