"""pass@k: the stable product form equals 1 - C(n-c,k)/C(n,k), edge cases, k filtering."""

import math

import numpy as np
import pytest

from lora_jax.evals import passk


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (10, 3, 4), (50, 7, 10),
                                   (256, 1, 100), (256, 200, 100), (20, 0, 20), (20, 19, 2)])
def test_matches_binomial_formula(n, c, k):
  want = 1.0 - math.comb(n - c, k) / math.comb(n, k)
  assert passk.pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_pass_at_1_is_fraction_correct():
  for n in (1, 7, 50):
    for c in range(n + 1):
      assert passk.pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_large_n_is_stable():
  # C(1000, 500) overflows a float; the product form must stay in [0, 1] and be monotone in c.
  values = [passk.pass_at_k(1000, c, 500) for c in (0, 1, 2, 10)]
  assert values[0] == 0.0 and all(0.0 <= v <= 1.0 for v in values)
  assert values == sorted(values) and values[1] > 0.49


def test_invalid_arguments():
  with pytest.raises(ValueError):
    passk.pass_at_k(5, 6, 1)
  with pytest.raises(ValueError):
    passk.pass_at_k(5, 1, 6)
  with pytest.raises(ValueError):
    passk.pass_at_k(5, 1, 0)


def test_estimate_and_table():
  est = passk.estimate_pass_at_k(10, [0, 5, 10], 1)
  np.testing.assert_allclose(est, [0.0, 0.5, 1.0])
  table = passk.pass_at_k_table([10, 10, 10], [0, 5, 10], ks=(1, 10, 100))
  assert set(table) == {1, 10}  # k=100 > n is dropped
  mean, stderr = table[1]
  assert mean == pytest.approx(0.5) and stderr == pytest.approx(0.5 / math.sqrt(3))
  want_stderr = np.std([0, 1, 1], ddof=1) / math.sqrt(3)
  assert table[10] == (pytest.approx(2 / 3), pytest.approx(want_stderr))
  assert passk.valid_ks([50, 20], (1, 10, 100, 10)) == [1, 10]
  with pytest.raises(ValueError):
    passk.estimate_pass_at_k([10, 10], [1], 1)


def test_curve_points_and_reading_them_back():
  from lora_jax.evals import passk
  assert passk.curve_ks() == tuple(range(1, 257)) and passk.CURVE_TEMPERATURE == 0.8
  results = {"results": [{"task": "humaneval", "metric": "pass@10", "value": 0.5},
                         {"task": "humaneval", "metric": "pass@2", "value": 0.3},
                         {"task": "humaneval", "metric": "unique_passing", "value": 3.0},
                         {"task": "gsm8k", "metric": "pass@1", "value": 0.9}]}
  assert passk.curve(results) == ([2, 10], [0.3, 0.5])
