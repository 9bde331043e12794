"""Spectral math: rank@p, effective rank, factor SVD, random baseline, intruder dimensions."""

import numpy as np
import pytest

from lora_jax.analysis import baseline, intruders, spectra


def _with_spectrum(s, m, n, seed=0):
  """A random m x n matrix whose singular values are exactly `s` (zero-padded)."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((m, m)))
  v, _ = np.linalg.qr(rng.standard_normal((n, n)))
  k = min(m, n)
  full = np.zeros(k)
  full[:len(s)] = s
  return ((u[:, :k] * full) @ v[:, :k].T).astype(np.float32)


@pytest.mark.parametrize("s,p,want", [
    ([3, 2, 1], 0.9, 2),        # energies 9, 4, 1 of 14: 13/14 = 0.93
    ([3, 2, 1], 0.5, 1),        # 9/14 = 0.64
    ([3, 2, 1], 0.95, 3),
    ([1] * 10, 0.9, 9),         # equal values: ceil(0.9 * 10)
    ([1] * 10, 1.0, 10),        # exactly rank 10, despite float32 round-off in the tail
    ([5] + [1] * 40, 0.5, 9),   # 25 + 8 >= 0.5 * 65 = 32.5
])
def test_rank_at_variance_exact_on_known_spectra(s, p, want):
  w = _with_spectrum(np.array(s, float), 64, 48)
  got = spectra.rank_at_variance(spectra.singular_values(w), p)
  assert got == want
  assert spectra.rank_at_variance(np.array(s, float), p) == want


def test_rank_at_variance_batched_and_edge_cases():
  s = np.array([[3, 2, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], float)
  np.testing.assert_array_equal(spectra.rank_at_variance(s, 0.9), [2, 4, 0])
  with pytest.raises(ValueError):
    spectra.rank_at_variance(s, 0.0)


def test_effective_rank_uses_sigma_normalization():
  assert spectra.effective_rank([2.0, 0, 0]) == pytest.approx(1.0)
  assert spectra.effective_rank([0.5] * 7) == pytest.approx(7.0)
  assert spectra.effective_rank([0.0, 0.0]) == 0.0
  # sigma-normalized (Roy & Vetterli): q = (3, 1) / 4; a sigma^2 normalization would give 1.38
  q = np.array([0.75, 0.25])
  assert spectra.effective_rank([3.0, 1.0]) == pytest.approx(np.exp(-(q * np.log(q)).sum()))


def test_singular_values_agree_with_numpy():
  rng = np.random.default_rng(1)
  for shape in [(3, 40, 40), (2, 64, 176), (2, 176, 64)]:
    w = rng.standard_normal(shape).astype(np.float32)
    ours = spectra.singular_values_stacked(w)
    ref = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * ref.max())


@pytest.mark.parametrize("m,n,r", [(64, 176, 4), (176, 64, 16), (50, 50, 1)])
def test_factor_svd_matches_dense(m, n, r):
  rng = np.random.default_rng(m + r)
  a = rng.standard_normal((m, r)).astype(np.float32)
  b = rng.standard_normal((r, n)).astype(np.float32)
  scale = 2.0
  dense = scale * a.astype(np.float64) @ b
  ref = np.linalg.svd(dense, compute_uv=False)[:r]
  s = spectra.factor_svd(a, b, scale)
  assert s.shape == (r,)
  np.testing.assert_allclose(s, ref, rtol=1e-4)
  u, s2, vh = spectra.factor_svd(a, b, scale, compute_uv=True)
  np.testing.assert_allclose((u * s2) @ vh, dense, rtol=0, atol=1e-4 * np.abs(dense).max())
  np.testing.assert_allclose(u.T @ u, np.eye(r), atol=1e-4)
  # the batched version used by `analyze` agrees too
  sb = spectra.factor_singular_values_stacked(np.stack([a, a]), np.stack([b, -b]), scale)
  np.testing.assert_allclose(sb, np.stack([ref, ref]), rtol=1e-4)


def test_pair_spectra_delta_and_norms():
  rng = np.random.default_rng(2)
  base = rng.standard_normal((2, 32, 24)).astype(np.float32)
  low = _with_spectrum([4.0, 4.0, 4.0], 32, 24, seed=3)
  out = spectra.pair_spectra(base, base + low)
  np.testing.assert_array_equal(spectra.rank_at_variance(out["delta"], 0.9), [3, 3])
  np.testing.assert_allclose(out["delta_fro"], [np.sqrt(48)] * 2, rtol=1e-4)
  np.testing.assert_allclose(out["base_fro"], np.linalg.norm(base, axis=(1, 2)), rtol=1e-5)
  rel = spectra.relative_norm(out["delta_fro"], out["base_fro"])
  np.testing.assert_allclose(rel, np.sqrt(48) / np.linalg.norm(base, axis=(1, 2)), rtol=1e-4)


def test_jit_cache_is_keyed_by_shape():
  w = np.ones((2, 12, 9), np.float32)
  spectra.singular_values_stacked(w)
  before = spectra.compiled_shapes()["_svals_LxK"]
  spectra.singular_values_stacked(w * 2)  # same shape: no new executable
  assert spectra.compiled_shapes()["_svals_LxK"] == before
  spectra.singular_values_stacked(np.ones((2, 9, 12), np.float32))
  assert spectra.compiled_shapes()["_svals_LxK"] == before + 1


def test_marchenko_pastur_square_and_rectangular():
  frac = baseline.marchenko_pastur_rank_fraction(0.9)
  assert 0.50 < frac < 0.52  # quarter-circle law: ~51% of the values hold 90% of the energy
  # flatter spectra (more rectangular) need a larger fraction
  assert baseline.marchenko_pastur_rank_fraction(0.9, 0.25) > frac
  assert baseline.marchenko_pastur_rank_fraction(0.5) < frac


def test_random_baseline_matches_marchenko_pastur():
  out = baseline.random_baseline(n=400, c=0.5, p=0.9, seed=0)
  expected = out["mp_expected_rank"]
  assert abs(out["rank_A"] - expected) <= 0.02 * 400
  assert abs(out["rank_A_plus_cB"] - expected) <= 0.02 * 400
  assert out["spectrum_A"].shape == (400,)
  assert out["rank_fraction_A"] == out["rank_A"] / 400


def _base_with_gap(m, n, seed=0):
  """A base kernel [m, n] with distinct, decaying singular values (well-defined vectors)."""
  return _with_spectrum(np.linspace(10.0, 1.0, min(m, n)), m, n, seed)


def test_no_intruders_for_small_noise():
  rng = np.random.default_rng(4)
  w = _base_with_gap(48, 64)
  out = intruders.intruder_dimensions(w, w + 1e-3 * rng.standard_normal(w.shape).astype(np.float32))
  assert out["count"] == 0
  assert out["k"] == intruders.DEFAULT_K == 10 and out["eps"] == intruders.DEFAULT_EPS == 0.5
  assert np.all(out["max_cos"] > 0.9)


def test_injected_orthogonal_direction_is_an_intruder():
  rng = np.random.default_rng(5)
  w = _base_with_gap(48, 64)  # [in=48, out=64]: the base's output singular vectors span 48 dims
  _, _, vh = np.linalg.svd(w.astype(np.float64))
  y = vh[48]  # unit output direction orthogonal to every base singular vector
  x = rng.standard_normal(48)
  x /= np.linalg.norm(x)
  out = intruders.intruder_dimensions(w, w + 30.0 * np.outer(x, y).astype(np.float32))
  assert out["count"] >= 1
  assert 0 in out["indices"]  # the largest singular direction of W_ft is the intruder
  assert out["max_cos"][0] < 0.1
  assert intruders.count_intruders(out["max_cos"], eps=0.0) == 0
