"""Unbiased pass@k (Chen et al., 2021): pass@k = 1 - C(n-c, k) / C(n, k), averaged over problems.

`pass_at_k(n, c, k)` uses the numerically stable product form of the human-eval repository,
1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms the (huge) binomial coefficients.

The paper's pass@k curve (Appendix F, Fig. S9): k = 1..256 from n = 256 samples per problem at
temperature 0.8 (CURVE_SAMPLES, CURVE_TEMPERATURE; `lora-jax eval --passk-curve`); `curve` reads
it back from a results dict.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


CURVE_SAMPLES = 256
CURVE_TEMPERATURE = 0.8


def curve_ks(num_samples: int = CURVE_SAMPLES) -> tuple[int, ...]:
  """Every k from 1 to n: the points of the pass@k curve."""
  return tuple(range(1, int(num_samples) + 1))


def curve(results: dict, task: str = "humaneval") -> tuple[list[int], list[float]]:
  """(ks, pass@k) of every pass@k entry of `task` in a results dict, sorted by k."""
  pts = sorted((int(e["metric"][len("pass@"):]), float(e["value"]))
               for e in results.get("results", [])
               if e.get("task") == task and str(e.get("metric", "")).startswith("pass@"))
  return [k for k, _ in pts], [v for _, v in pts]


def pass_at_k(n: int, c: int, k: int) -> float:
  """P(at least one of k samples drawn without replacement from n, c of them correct, passes)."""
  n, c, k = int(n), int(c), int(k)
  if not 0 <= c <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
  if not 1 <= k <= n:
    raise ValueError(f"pass@k needs 1 <= k <= n, got n={n}, k={k}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def estimate_pass_at_k(num_samples: int | Sequence[int], num_correct: Sequence[int],
                       k: int) -> np.ndarray:
  """Per-problem pass@k. `num_samples` is one n for all problems or one n per problem."""
  num_correct = list(num_correct)
  if isinstance(num_samples, (int, np.integer)):
    num_samples = [int(num_samples)] * len(num_correct)
  num_samples = list(num_samples)
  if len(num_samples) != len(num_correct):
    raise ValueError(f"{len(num_samples)} sample counts for {len(num_correct)} correct counts")
  return np.array([pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct)], np.float64)


def valid_ks(num_samples: Iterable[int], ks: Iterable[int] = (1, 10, 100)) -> list[int]:
  """The ks that every problem supports (k <= n for all n), sorted and deduplicated."""
  n_min = min(num_samples, default=0)
  return sorted({int(k) for k in ks if 1 <= int(k) <= n_min})


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
  """Mean over problems and its standard error (sample std, ddof=1, / sqrt(#problems); 0 if < 2)."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    return float("nan"), float("nan")
  stderr = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
  return float(x.mean()), stderr


def pass_at_k_table(num_samples: Sequence[int], num_correct: Sequence[int],
                    ks: Iterable[int] = (1, 10, 100)) -> dict[int, tuple[float, float]]:
  """{k: (mean pass@k, stderr over problems)} for each k that all problems support."""
  return {k: mean_and_stderr(estimate_pass_at_k(num_samples, num_correct, k))
          for k in valid_ks(num_samples, ks)}
