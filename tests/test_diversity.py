"""Unique completions per problem, split by passing / failing, and the aggregated entries."""

import pytest

from lora_jax.evals import diversity


def _rows():
  return [
      {"task_id": "T/0", "completion": "  return 1\n", "passed": True},
      {"task_id": "T/0", "completion": "  return 1\n\n\n", "passed": True},  # same after rstrip
      {"task_id": "T/0", "completion": "  return  1\n", "passed": True},   # inner space differs
      {"task_id": "T/0", "completion": "  return 2\n", "passed": False},
      {"task_id": "T/1", "completion": "", "passed": False},
      {"task_id": "T/1", "completion": "\n", "passed": False},
      {"task_id": "T/1", "completion": "  pass", "passed": False},
      {"task_id": "T/1", "completion": "  pass", "passed": False},
  ]


def test_normalization_strips_only_trailing_whitespace():
  assert diversity.normalize_completion("  x = 1 \n\t\n") == "  x = 1"
  assert diversity.normalize_completion("\n  x") == "\n  x"


def test_unique_counts():
  counts = diversity.unique_counts(_rows())
  assert list(counts) == ["T/0", "T/1"]
  assert counts["T/0"]["passing"] == {"unique": 2, "total": 3}
  assert counts["T/0"]["failing"] == {"unique": 1, "total": 1}
  assert counts["T/0"]["all"] == {"unique": 3, "total": 4}
  assert counts["T/1"]["passing"] == {"unique": 0, "total": 0}
  assert counts["T/1"]["failing"] == {"unique": 2, "total": 4}


def test_entries():
  entries = diversity.diversity_entries(_rows(), settings={"temperature": 0.2})
  by = {e["metric"]: e for e in entries}
  assert set(by) == {"unique_passing", "unique_failing", "unique_all"}
  assert by["unique_passing"]["value"] == pytest.approx(1.0)   # (2 + 0) / 2
  assert by["unique_failing"]["value"] == pytest.approx(1.5)   # (1 + 2) / 2
  assert by["unique_all"]["value"] == pytest.approx(2.5)
  assert by["unique_all"]["stderr"] == pytest.approx(0.5)
  e = by["unique_failing"]
  assert e["task"] == "humaneval" and e["n"] == 4 and e["num_problems"] == 2
  assert e["settings"] == {"temperature": 0.2}
  assert e["per_problem"]["T/1"] == {"unique": 2, "total": 4}
