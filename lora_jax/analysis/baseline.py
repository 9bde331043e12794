"""The paper's random-matrix baseline: what "high rank" means for a matrix with no structure.

A Gaussian matrix A [N, N] and the perturbed A + c B (B an independent Gaussian) have spectra that
follow the Marchenko-Pastur law; their rank@p is a large fraction of N. Comparing a weight update's
rank@90% with this baseline tells how far from low-rank it is.

`marchenko_pastur_rank_fraction(p, aspect)` is the large-N expectation of rank@p / min(M, N) for an
M x N matrix with i.i.d. entries: singular values of X / sqrt(N) (aspect y = min/max <= 1) have
squares distributed on [(1 - sqrt y)^2, (1 + sqrt y)^2] with density
sqrt((b - x)(x - a)) / (2 pi y x); the top fraction t of them holds the fraction p of sum s^2.
"""

from __future__ import annotations

import numpy as np

from lora_jax.analysis import spectra


def marchenko_pastur_rank_fraction(p: float = 0.9, aspect: float = 1.0, grid: int = 200_001) -> float:
  """Expected rank@p / min(M, N) of a large i.i.d. Gaussian matrix with min/max side ratio `aspect`."""
  if not 0 < aspect <= 1:
    raise ValueError(f"aspect must be in (0, 1], got {aspect}")
  y = float(aspect)
  lo, hi = (1 - np.sqrt(y)) ** 2, (1 + np.sqrt(y)) ** 2
  # Integrate over s = sqrt(x) (removes the 1/sqrt(x) singularity at x = 0 when y = 1):
  # density of s is 2 s p(s^2) = sqrt((b - s^2)(s^2 - a)) / (pi y s).
  s = np.linspace(np.sqrt(lo), np.sqrt(hi), grid)
  with np.errstate(divide="ignore", invalid="ignore"):
    dens = np.sqrt(np.clip((hi - s * s) * (s * s - lo), 0, None)) / (np.pi * y * s)
  dens = np.nan_to_num(dens, nan=0.0, posinf=0.0)
  if y == 1.0:
    dens[0] = 2 / np.pi  # limit of sqrt(4 - s^2) / pi at s = 0
  # Cumulate from the top (largest s) down: fraction of values and fraction of energy.
  ds = np.diff(s)
  mass = 0.5 * (dens[1:] + dens[:-1]) * ds
  energy = 0.5 * (dens[1:] * s[1:] ** 2 + dens[:-1] * s[:-1] ** 2) * ds
  mass_top = np.cumsum(mass[::-1])
  energy_top = np.cumsum(energy[::-1]) / energy.sum()
  i = int(np.searchsorted(energy_top, p))
  return float(mass_top[min(i, len(mass_top) - 1)] / mass.sum())


def random_baseline(n: int = 1000, m: int | None = None, c: float = 1.0, p: float = 0.9,
                    seed: int = 0) -> dict:
  """rank@p of Gaussian A [n, m] and A + c B, measured with the same SVD as the weights.

  Returns {"shape", "c", "variance", "rank_A", "rank_A_plus_cB", "rank_fraction_A",
  "mp_expected_rank", "spectrum_A", "spectrum_A_plus_cB"} (spectra as numpy arrays).
  """
  m = n if m is None else m
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((n, m), dtype=np.float32)
  b = rng.standard_normal((n, m), dtype=np.float32)
  s = spectra.singular_values_stacked(np.stack([a, a + np.float32(c) * b]))
  k = min(n, m)
  ranks = spectra.rank_at_variance(s, p)
  expected = marchenko_pastur_rank_fraction(p, k / max(n, m)) * k
  return {"shape": [n, m], "c": float(c), "variance": float(p), "rank_A": int(ranks[0]),
          "rank_A_plus_cB": int(ranks[1]), "rank_fraction_A": float(ranks[0] / k),
          "mp_expected_rank": float(expected), "spectrum_A": s[0], "spectrum_A_plus_cB": s[1]}


def attach_random_baseline(analysis, n: int = 1000, c: float = 1.0, seed: int = 0):
  """Stores `random_baseline` at the analysis's variance in `analysis.meta["random_baseline"]`
  and its spectra as `analysis.spectra["random.A"]` / `["random.A_plus_cB"]`; returns analysis."""
  out = random_baseline(n=n, c=c, p=analysis.meta["variance"], seed=seed)
  analysis.spectra["random.A"] = out.pop("spectrum_A")
  analysis.spectra["random.A_plus_cB"] = out.pop("spectrum_A_plus_cB")
  analysis.meta["random_baseline"] = dict(out, seed=seed)
  return analysis
