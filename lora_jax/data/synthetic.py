"""A small deterministic corpus generated in-process, so tiny configs train with no files.

`SyntheticSource(n, regime, fmt)` is a random-access source: record i depends only on i.
CPT records are `{text_field: ...}` documents of templated sentences and arithmetic lines
(1-12 lines, so some documents span several packed rows). IFT records are arithmetic word
problems (metamath), tiny Python functions (magicoder) or one- or two-turn arithmetic chats
(chat); fmt="auto" cycles through the three formats.
"""

from __future__ import annotations

import numpy as np

from lora_jax.data.errors import DataError

WHERE = "_where"
_SEED = 20240509  # fixed: the corpus is the same for every run seed

_ADJ = ("quick", "lazy", "red", "small", "bright", "quiet", "old", "happy")
_NOUN = ("fox", "dog", "cat", "bird", "robot", "river", "teacher", "garden")
_VERB = ("sees", "follows", "helps", "paints", "finds", "watches")
_NAME = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Fay")
_ITEM = ("apples", "books", "coins", "shells", "stamps")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _pick(options, r: int):
  return options[int(r) % len(options)]


def _cpt_text(rng: np.random.Generator) -> str:
  n = int(rng.integers(1, 13))
  draws = rng.integers(0, 1 << 30, size=(n, 6))  # one RNG call per document (speed)
  lines = []
  for d in draws:
    if d[0] % 2:
      a, b, op = int(d[1] % 100), int(d[2] % 100), _pick(tuple(_OPS), d[3])
      lines.append(f"{a} {op} {b} = {_OPS[op](a, b)}")
    else:
      w = [_pick(v, x) for v, x in zip((_ADJ, _NOUN, _VERB, _ADJ, _NOUN), d[1:])]
      lines.append(f"The {w[0]} {w[1]} {w[2]} the {w[3]} {w[4]}.")
  return "\n".join(lines)


def _metamath(rng: np.random.Generator) -> dict:
  d = rng.integers(0, 1 << 30, size=4)
  name, item, a, b = _pick(_NAME, d[0]), _pick(_ITEM, d[1]), int(d[2] % 49 + 1), int(d[3] % 49 + 1)
  return {
      "query": f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
      "response": f"{name} starts with {a} {item} and gets {b} more, so {name} has "
                  f"{a} + {b} = {a + b} {item}.\nThe answer is: {a + b}",
  }


def _magicoder(rng: np.random.Generator) -> dict:
  d = rng.integers(0, 1 << 30, size=2)
  op, k = _pick(tuple(_OPS), d[0]), int(d[1] % 9 + 1)
  fname = {"+": "add", "-": "sub", "*": "mul"}[op] + f"_{k}"
  return {
      "instruction": f"Write a Python function `{fname}(x)` that returns x {op} {k}.",
      "response": f"```python\ndef {fname}(x):\n    return x {op} {k}\n```",
  }


def _chat(rng: np.random.Generator) -> dict:
  r = rng.integers(0, 1 << 30, size=5)
  a, b, d = (int(x % 29 + 1) for x in r[:3])
  op = _pick(tuple(_OPS), r[3])
  c = _OPS[op](a, b)
  msgs = [{"role": "user", "content": f"What is {a} {op} {b}?"},
          {"role": "assistant", "content": f"{a} {op} {b} = {c}."}]
  if r[4] % 2:
    msgs += [{"role": "user", "content": f"Now add {d}."},
             {"role": "assistant", "content": f"{c} + {d} = {c + d}."}]
  return {"messages": msgs}


_IFT = {"metamath": _metamath, "magicoder": _magicoder, "chat": _chat}


class SyntheticSource:
  """`n` generated records; record i is a pure function of (i, regime, fmt)."""

  def __init__(self, n: int, regime: str = "cpt", fmt: str = "auto", text_field: str = "text"):
    if n <= 0:
      raise DataError("data.synthetic_docs", f"must be positive, got {n}")
    if regime not in ("cpt", "ift"):
      raise DataError("data.regime", f"expected 'cpt' or 'ift', got {regime!r}")
    if regime == "ift" and fmt != "auto" and fmt not in _IFT:
      raise DataError("data.format", f"unknown IFT format {fmt!r}; expected 'auto' or one of "
                      f"{tuple(_IFT)}")
    self._n, self._regime, self._fmt, self._field = n, regime, fmt, text_field

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self._n:
      raise IndexError(f"record {index} out of range [0, {self._n})")
    rng = np.random.default_rng([_SEED, index])
    if self._regime == "cpt":
      record = {self._field: _cpt_text(rng)}
    else:
      fmt = self._fmt if self._fmt != "auto" else tuple(_IFT)[index % len(_IFT)]
      record = _IFT[fmt](rng)
    record[WHERE] = f"synthetic:doc {index + 1}"
    return record
