"""GSM8K: answer extraction on tricky strings, both row formats, k-shot prompts, scoring."""

import json
import os

import pytest

from lora_jax.data.errors import DataError
from lora_jax.evals import gsm8k
from lora_jax.evals.task_data import read_rows

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "evals")


def _problems(rel):
  return gsm8k.parse_problems(read_rows(os.path.join(FIX, rel)))


@pytest.mark.parametrize("text,strict,flexible", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7", "7"),
    ("#### 1,000\n\nQuestion:", "1000", "1000"),
    # strict wants a digit right after "#### "
    ("The total is $1,234.50. #### $1,234.50", "invalid", "1234.5"),
    ("#### 18.", "18", "18"),
    ("#### 5.00", "5", "5"),
    ("#### -3\nextra 99", "-3", "99"),
    ("The answer is 42.", "invalid", "42"),
    ("no numbers here", "invalid", "invalid"),
    ("#### 12 and later #### 13", "12", "13"),
    ("It costs $7", "invalid", "7"),
    ("x = 0.5", "invalid", "0.5"),
])
def test_extraction(text, strict, flexible):
  norm = lambda s: "[invalid]" if s == "[invalid]" else gsm8k.normalize_number(s)  # noqa: E731
  assert norm(gsm8k.extract_strict(text)).replace("[invalid]", "invalid") == strict
  assert norm(gsm8k.extract_flexible(text)).replace("[invalid]", "invalid") == flexible


def test_normalize_number():
  n = gsm8k.normalize_number
  assert n(" 1,000 ") == "1000" and n("$5") == "5" and n("5.") == "5" and n("5.0") == "5"
  assert n("2.50") == "2.5" and n("-0") == "0" and n("18,000") == "18000" and n("abc") == "abc"


def test_parse_hf_and_gauntlet_formats():
  test = _problems("gsm8k/test.jsonl")
  assert [p.answer for p in test] == ["12", "10", "850", "210", "2.25", "-6"]
  assert test[0].target.endswith("#### 12") and test[0].where.endswith("test.jsonl:1")
  train = _problems("gsm8k/train.jsonl")
  assert train[-1].answer == "18000"  # "18,000" normalized
  g = _problems("gauntlet/gsm8k.jsonl")
  assert [p.answer for p in g] == ["6", "42", "45"]
  assert g[0].target == "Ben gives away 4 of his 10 stickers, so he has 10 - 4 = 6 left.\n#### 6"


def test_malformed_rows_name_file_and_line(tmp_path):
  bad = tmp_path / "test.jsonl"
  bad.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
  with pytest.raises(DataError, match=r"test.jsonl:1: answer has no '#### <number>'"):
    gsm8k.parse_problems(read_rows(str(bad)))
  bad.write_text("\n" + json.dumps({"prompt": "q"}) + "\n")
  with pytest.raises(DataError, match=r"test.jsonl:2: unrecognized row"):
    gsm8k.parse_problems(read_rows(str(bad)))
  bad.write_text("{not json\n")
  with pytest.raises(DataError, match=r"test.jsonl:1: bad JSON"):
    read_rows(str(bad))


def test_prompt_format_matches_lm_eval():
  test, train = _problems("gsm8k/test.jsonl"), _problems("gsm8k/train.jsonl")
  prompt = gsm8k.build_prompt(test[0], train[:2])
  assert prompt == (
      "Question: Sam has 7 marbles and finds 5 more. How many marbles does he have?\n"
      "Answer: 7 + 5 = <<7+5=12>>12.\n#### 12\n\n"
      "Question: A car travels 60 km per hour for 3 hours. How far does it go?\n"
      "Answer: 60 * 3 = <<60*3=180>>180 km.\n#### 180\n\n"
      "Question: Mia has 3 boxes with 4 pencils in each box. How many pencils does she have?\n"
      "Answer:")
  assert gsm8k.build_prompt(test[0], []).startswith("Question: Mia")


def test_evaluate_with_fake_generator():
  test, train = _problems("gsm8k/test.jsonl"), _problems("gsm8k/train.jsonl")
  calls = []
  canned = [" 3 * 4 = 12\n#### 12", " She pays 10 so change is $10.", " #### 850", " 210 pages",
            " #### 2.250", " The answer is -6"]

  def generate_fn(prompts, *, n, temperature, top_p, max_new_tokens, stop, seed):
    calls.append(dict(n=n, temperature=temperature, stop=stop, prompts=prompts))
    return [[canned[i]] for i in range(len(prompts))]

  entries, rows = gsm8k.evaluate_gsm8k(generate_fn, test, train, num_fewshot=5)
  by = {e["metric"]: e for e in entries}
  assert by["strict_match"]["value"] == pytest.approx(3 / 6)  # 12, 850, 2.250
  assert by["flexible_match"]["value"] == pytest.approx(6 / 6)
  assert by["strict_match"]["settings"]["headline_metric"] == "strict_match"
  assert by["strict_match"]["n"] == 6 and by["strict_match"]["stderr"] > 0
  assert calls[0]["n"] == 1 and calls[0]["temperature"] == 0.0
  assert calls[0]["stop"] == ["Question:", "</s>", "<|im_end|>"]
  assert all(p.count("Question:") == 6 for p in calls[0]["prompts"])
  assert rows[1]["strict_pred"] == "[invalid]" and rows[1]["flexible_pred"] == "10"
  # Fixed seed: the same shots every run; --limit keeps the first problems' prompts unchanged.
  _, rows2 = gsm8k.evaluate_gsm8k(generate_fn, test, train, num_fewshot=5, limit=2)
  assert [r["prompt"] for r in rows2] == [r["prompt"] for r in rows[:2]]


def test_shots_from_eval_split_exclude_self():
  g = _problems("gauntlet/gsm8k.jsonl")
  seen = []

  def generate_fn(prompts, **kw):
    seen.extend(prompts)
    return [[""] for _ in prompts]

  gsm8k.evaluate_gsm8k(generate_fn, g, None, num_fewshot=2)
  for p, prob in zip(seen, g):
    assert p.count(prob.question) == 1 and p.count("Question:") == 3
  with pytest.raises(ValueError, match="num_fewshot=3"):
    gsm8k.evaluate_gsm8k(generate_fn, g, None, num_fewshot=3)
