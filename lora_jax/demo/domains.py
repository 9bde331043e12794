"""The demo's two synthetic domains, generated in-process from a seed (no files, no network).

source  The base model's "general knowledge": facts about made-up entities (`kav.col=` ->
        `red`, `kav.num=` -> `42`, a random knowledge base drawn from the seed) and string
        skills under a task word (`srt` sort, `nxt` shift every symbol by one: a->b, 9->0) on
        5-8 letters or digits. Metric (forgetting, scored as the paper scores HellaSwag / ARC /
        WinoGrande): 4-way multiple choice by log-likelihood. Fact questions offer three other
        values of the attribute; skill questions, on unseen strings, offer other
        transformations of the same string (reverse, shift, the string itself), so a model
        that loses a fact or mixes skills up picks a wrong answer.
target  Digit-wise arithmetic through a secret lookup table: `a*b=` with a, b strings of
        `n_digits` digits and answer digit i = TABLE[a_i][b_i], a random 10x10 table drawn
        from the seed. Its own token statistics (mostly digits, and `*`, which the source never
        uses), new knowledge (100 table entries), compatible with old skills (reading digit
        strings position by position, writing digits). Held-out metric (learning, scored as the paper does with
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
    "srt": lambda s: "".join(sorted(s)),
    "nxt": shift,
    "rev": lambda s: s[::-1],
    "prv": lambda s: shift(s, -1),
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


COLORS = ("red", "tan", "sky", "ash", "ink", "jet", "fig", "oak")
ATTRIBUTES = ("col", "num")


def _attribute_value(rng: np.random.Generator, attr: str) -> str:
  """A random value of a fact attribute: a colour word, or a 2-digit number."""
  if attr == "col":
    return COLORS[int(rng.integers(len(COLORS)))]
  return "".join(DIGITS[i] for i in rng.integers(0, 10, 2))


class SourceDomain:
  """Skills (sort / shift on letter or digit strings) and facts (a random knowledge base)."""
  name = "source"

  def __init__(self, seed: int, skills: Sequence[str] = ("srt", "nxt"), n_entities: int = 120,
               fact_fraction: float = 1 / 3, digit_fraction: float = 0.3, min_len: int = 5,
               max_len: int = 8):
    unknown = [s for s in skills if s not in SKILLS]
    if unknown:
      raise ValueError(f"unknown source skills {unknown}; choose from {sorted(SKILLS)}")
    self.skills = tuple(skills)
    self.fact_fraction = float(fact_fraction)
    self.digit_fraction = float(digit_fraction)
    self.min_len, self.max_len = int(min_len), int(max_len)
    rng = _rng(seed, "source/facts")
    names: set[str] = set()
    while len(names) < n_entities:
      names.add("".join(LETTERS[i] for i in rng.integers(0, 26, 3)))
    self.entities = tuple(sorted(names))
    self.facts = {e: {a: _attribute_value(rng, a) for a in ATTRIBUTES} for e in self.entities}

  def describe(self) -> str:
    return (f"facts about {len(self.entities)} made-up entities (`kav.col=` -> `red`, "
            f"`kav.num=` -> `42`; {self.fact_fraction:.0%} of samples) and skills "
            f"{', '.join(self.skills)} (sort / shift by one) on strings of {self.min_len}-"
            f"{self.max_len} letters or digits")

  def _fact(self, rng: np.random.Generator) -> tuple[str, str]:
    entity = self.entities[int(rng.integers(len(self.entities)))]
    return entity, ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]

  def _skill(self, rng: np.random.Generator) -> tuple[str, str]:
    skill = self.skills[int(rng.integers(len(self.skills)))]
    n = int(rng.integers(self.min_len, self.max_len + 1))
    alphabet = DIGITS if rng.random() < self.digit_fraction else LETTERS
    return skill, "".join(alphabet[i] for i in rng.integers(0, len(alphabet), n))

  def sample(self, rng: np.random.Generator) -> Example:
    if rng.random() < self.fact_fraction:
      entity, attr = self._fact(rng)
      return Example(f"{entity}.{attr}=", self.facts[entity][attr])
    skill, s = self._skill(rng)
    return Example(f"{skill} {s}=", SKILLS[skill](s))

  def train_set(self, n: int, seed: int) -> list[Example]:
    rng = _rng(seed, "source/train")
    return [self.sample(rng) for _ in range(n)]

  def choice_eval(self, n: int, seed: int, exclude: Iterable[str] = ()) -> list[ChoiceItem]:
    """4-way questions. Facts: the entity's value vs three other values of the attribute (the
    fact is the knowledge being tested, so fact questions repeat training prompts). Skills, on
    unseen strings: the right output vs other transformations of the same string."""
    rng = _rng(seed, "source/eval-choice")
    seen = set(exclude)
    items: list[ChoiceItem] = []
    while len(items) < n:
      if rng.random() < self.fact_fraction:
        entity, attr = self._fact(rng)
        prompt, answer = f"{entity}.{attr}=", self.facts[entity][attr]
        wrong: list[str] = []
        while len(wrong) < 3:
          cand = _attribute_value(rng, attr)
          if cand != answer and cand not in wrong:
            wrong.append(cand)
      else:
        skill, s = self._skill(rng)
        prompt, answer = f"{skill} {s}=", SKILLS[skill](s)
        if prompt in seen:
          continue
        wrong = []
        for cand in [SKILLS[k](s) for k in SKILLS if k != skill] + [s, shift(answer, -1)]:
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
  """`a*b=` -> digit-wise lookup in secret 10x10 tables (the finetuning domain).

  With `per_position` each digit position has its own table (n_digits x 100 entries to learn),
  otherwise one table serves every position (100 entries).
  """
  name = "target"

  def __init__(self, seed: int, n_digits: int = 3, per_position: bool = True):
    self.n_digits = int(n_digits)
    self.per_position = bool(per_position)
    n_tables = self.n_digits if self.per_position else 1
    self.tables = _rng(seed, "target/table").integers(0, 10, (n_tables, 10, 10))

  @property
  def table(self) -> np.ndarray:
    """The first position's table."""
    return self.tables[0]

  def describe(self) -> str:
    if self.per_position:
      rule = f"TABLE_i[a_i][b_i] (a secret random 10x10 table per position: {self.tables.size} " \
             "entries of new knowledge)"
    else:
      rule = "TABLE[a_i][b_i] (one secret random 10x10 table)"
    return f"`a*b=` with {self.n_digits}-digit a, b; answer digit i = {rule}"

  def answer(self, a: str, b: str) -> str:
    t = self.tables
    return "".join(str(int(t[i % len(t), int(x), int(y)])) for i, (x, y) in enumerate(zip(a, b)))

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
