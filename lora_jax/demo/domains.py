"""The demo's two synthetic domains, generated in-process from a seed (no files, no network).

source  Algorithmic string skills, each under its own task word: `rev` (reverse), `srt` (sort),
        `nxt` (shift every symbol by one: a->b, 9->0), over strings of 5-8 lowercase letters or,
        for `rev` / `srt`, digits. The base model is pretrained on it: the demo's "general
        knowledge". Held-out metric (forgetting, scored as the paper does with HellaSwag / ARC /
        WinoGrande): 4-way multiple choice by log-likelihood; the distractors are the other
        skills applied to the same string (and the unchanged string), so a model that loses a
        skill or mixes skills up picks a wrong answer.
target  Digit-wise arithmetic through a secret lookup table: `a*b=` with a, b strings of
        `n_digits` digits and answer digit i = TABLE[a_i][b_i], a random 10x10 table drawn
        from the seed. Its own token statistics (digits and `*`, little of either in the
        source), new knowledge (100 table entries), compatible with old skills (reading digit
        strings position by position). Held-out metric (learning, scored as the paper does with
        GSM8K / HumanEval): exact match of the greedy completion on unseen operand pairs.

`Example(prompt, response)` is one IFT sample (loss on the response); `ChoiceItem(context,
choices, gold)` one multiple-choice question. Every set is a pure function of (domain, n, seed);
held-out sets exclude every prompt of the training set they are drawn against.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import numpy as np

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"


@dataclasses.dataclass(frozen=True)
class Example:
  prompt: str
  response: str


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
  context: str
  choices: tuple[str, ...]
  gold: int


def _rng(seed: int, stream: str) -> np.random.Generator:
  """An independent generator per (seed, named stream): train / eval sets never share draws."""
  return np.random.default_rng([int(seed), *stream.encode()])


def shift(s: str, k: int = 1) -> str:
  """Every letter / digit moved k places along its alphabet, wrapping around."""
  out = []
  for c in s:
    alphabet = LETTERS if c in LETTERS else DIGITS
    out.append(alphabet[(alphabet.index(c) + k) % len(alphabet)])
  return "".join(out)


SKILLS: dict[str, Callable[[str], str]] = {
    "rev": lambda s: s[::-1],
    "srt": lambda s: "".join(sorted(s)),
    "nxt": shift,
}


def _unique(draw: Callable[[], Example], n: int, exclude: Iterable[str] = ()) -> list[Example]:
  """n examples from `draw` whose prompts are distinct and not in `exclude`."""
  seen = set(exclude)
  out: list[Example] = []
  for _ in range(n * 50):
    if len(out) == n:
      break
    ex = draw()
    if ex.prompt not in seen:
      seen.add(ex.prompt)
      out.append(ex)
  if len(out) < n:
    raise ValueError(f"could only draw {len(out)} distinct held-out examples of {n}")
  return out


class SourceDomain:
  """Reverse / sort / shift skills on letter and digit strings (the pretraining domain)."""
  name = "source"

  def __init__(self, skills: Sequence[str] = ("rev", "srt", "nxt"), digit_fraction: float = 0.3,
               min_len: int = 5, max_len: int = 8):
    unknown = [s for s in skills if s not in SKILLS]
    if unknown:
      raise ValueError(f"unknown source skills {unknown}; choose from {sorted(SKILLS)}")
    self.skills = tuple(skills)
    self.digit_fraction = float(digit_fraction)
    self.min_len, self.max_len = int(min_len), int(max_len)

  def describe(self) -> str:
    return (f"skills {', '.join(self.skills)} on strings of {self.min_len}-{self.max_len} "
            f"letters (or digits for rev/srt, {self.digit_fraction:.0%})")

  def _draw(self, rng: np.random.Generator) -> tuple[str, str]:
    skill = self.skills[int(rng.integers(len(self.skills)))]
    n = int(rng.integers(self.min_len, self.max_len + 1))
    digits = skill != "nxt" and rng.random() < self.digit_fraction
    alphabet = DIGITS if digits else LETTERS
    return skill, "".join(alphabet[i] for i in rng.integers(0, len(alphabet), n))

  def sample(self, rng: np.random.Generator) -> Example:
    skill, s = self._draw(rng)
    return Example(f"{skill} {s}=", SKILLS[skill](s))

  def train_set(self, n: int, seed: int) -> list[Example]:
    rng = _rng(seed, "source/train")
    return [self.sample(rng) for _ in range(n)]

  def generation_eval(self, n: int, seed: int, exclude: Iterable[str] = ()) -> list[Example]:
    rng = _rng(seed, "source/eval-gen")
    return _unique(lambda: self.sample(rng), n, exclude)

  def choice_eval(self, n: int, seed: int, exclude: Iterable[str] = ()) -> list[ChoiceItem]:
    """4-way questions: the right skill's output vs other skills' outputs / the input itself."""
    rng = _rng(seed, "source/eval-choice")
    seen = set(exclude)
    items: list[ChoiceItem] = []
    while len(items) < n:
      skill, s = self._draw(rng)
      prompt = f"{skill} {s}="
      answer = SKILLS[skill](s)
      if prompt in seen:
        continue
      wrong = []
      for cand in [SKILLS[k](s) for k in self.skills if k != skill] + [s, shift(answer, -1)]:
        if cand != answer and cand not in wrong:
          wrong.append(cand)
      if len(wrong) < 3:  # e.g. a string that is already sorted: draw another
        continue
      seen.add(prompt)
      gold = int(rng.integers(4))
      choices = wrong[:3]
      choices.insert(gold, answer)
      items.append(ChoiceItem(prompt, tuple(choices), gold))
    return items


class TargetDomain:
  """`a*b=` -> digit-wise lookup in a secret 10x10 table (the finetuning domain)."""
  name = "target"

  def __init__(self, seed: int, n_digits: int = 3):
    self.n_digits = int(n_digits)
    self.table = _rng(seed, "target/table").integers(0, 10, (10, 10))

  def describe(self) -> str:
    return (f"a*b= with {self.n_digits}-digit a, b; answer digit i = TABLE[a_i][b_i] "
            "(a secret random 10x10 table)")

  def answer(self, a: str, b: str) -> str:
    return "".join(str(int(self.table[int(x), int(y)])) for x, y in zip(a, b))

  def sample(self, rng: np.random.Generator) -> Example:
    a, b = ("".join(DIGITS[i] for i in rng.integers(0, 10, self.n_digits)) for _ in range(2))
    return Example(f"{a}*{b}=", self.answer(a, b))

  def train_set(self, n: int, seed: int) -> list[Example]:
    rng = _rng(seed, "target/train")
    return [self.sample(rng) for _ in range(n)]

  def generation_eval(self, n: int, seed: int, exclude: Iterable[str] = ()) -> list[Example]:
    rng = _rng(seed, "target/eval-gen")
    return _unique(lambda: self.sample(rng), n, exclude)


# --------------------------------------------------------------------------- metrics
def exact_match_accuracy(examples: Sequence[Example], completions: Sequence[str]) -> float:
  """Fraction of completions equal to the response (surrounding whitespace ignored)."""
  if len(examples) != len(completions):
    raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
  if not examples:
    return float("nan")
  hits = [c.strip() == ex.response for ex, c in zip(examples, completions)]
  return float(np.mean(hits))


def choice_accuracy(items: Sequence[ChoiceItem], scores: Sequence[Sequence[float]]) -> float:
  """Fraction of items whose highest-scoring choice is the gold one (ties -> first)."""
  if len(items) != len(scores):
    raise ValueError(f"{len(items)} items but {len(scores)} score lists")
  if not items:
    return float("nan")
  return float(np.mean([int(np.argmax(s)) == it.gold for it, s in zip(items, scores)]))
