"""Multiple-choice tasks: preprocessing, WinoGrande partial scoring, all formats, metrics."""

import json
import os

import pytest

from lora_jax.data.errors import DataError
from lora_jax.evals import multiple_choice as mc
from lora_jax.evals.scoring import Score
from lora_jax.evals.task_data import read_rows

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "evals")


def _docs(task, rel):
  return mc.parse_docs(task, read_rows(os.path.join(FIX, rel)))


def test_hellaswag_preprocess_known_inputs():
  p = mc.hellaswag_preprocess
  assert p("  Home and Garden: [header] How to water a cactus [title] Check the soil first. "
           "[step] push a finger into the soil ") == (
               "Home and Garden: How to water a cactus. Check the soil first. push a finger into "
               "the soil")
  assert p("to see whether it is dry [substeps] water only when it is.") == (
      "to see whether it is dry water only when it is.")
  assert p("no brackets here") == "no brackets here"


def test_hellaswag_docs():
  docs = _docs("hellaswag", "hellaswag/validation.jsonl")
  assert len(docs) == 5 and [d.gold for d in docs] == [0, 0, 1, 2, 3]
  d = docs[0]
  assert d.contexts[0] == ("Making tea: A man fills a kettle with water and puts it on the stove. "
                           "He")  # ctx_b capitalized
  assert d.continuations[0] == " waits for the water to boil and pours it over a tea bag."
  assert d.choice_texts[0] == "waits for the water to boil and pours it over a tea bag."
  assert docs[1].contexts[0] == ("Home and Garden: How to water a cactus. Check the soil first. "
                                 "push a finger into the soil")
  # ctx_b is "": the context is ctx_a plus a trailing space, stripped by preprocess
  assert docs[3].contexts[0] == "Washing dishes: A boy stands at the sink with a sponge."
  assert docs[4].contexts[0].endswith("start. The gun fires and")


def test_winogrande_partial_scoring_split():
  s = "The trophy did not fit in the suitcase because the _ was too big."
  assert mc.winogrande_split(s, "trophy") == (
      "The trophy did not fit in the suitcase because the trophy", " was too big.")
  docs = _docs("winogrande", "winogrande/validation.jsonl")
  d = docs[0]
  assert d.contexts == ("The trophy did not fit in the suitcase because the trophy",
                        "The trophy did not fit in the suitcase because the suitcase")
  assert d.continuations == (" was too big.", " was too big.")
  assert [x.gold for x in docs] == [0, 1, 1, 1, 0]
  assert d.shot() == "The trophy did not fit in the suitcase because the trophy was too big."


def test_arc_and_piqa_docs():
  docs = _docs("arc_challenge", "arc_challenge/test.jsonl")
  assert [d.gold for d in docs] == [1, 2, 1, 0, 2]  # letter and numeric answer keys
  assert [len(d.contexts) for d in docs] == [4, 4, 3, 4, 5]
  assert docs[0].contexts[0] == (
      "Question: Which gas do plants take in from the air to make food?\nAnswer:")
  assert docs[0].continuations[1] == " carbon dioxide"
  piqa = _docs("piqa", "piqa/validation.jsonl")
  assert piqa[1].contexts[0] == "Question: To open a jar with a tight lid,\nAnswer:"
  assert piqa[1].gold == 1
  assert piqa[1].continuations[1] == " run the lid under hot water, then twist."


def test_gauntlet_formats():
  hs = _docs("hellaswag", "gauntlet/hellaswag.jsonl")
  assert hs[0].contexts[0].endswith("on the stove. He ") and hs[0].continuations[0] == (
      "waits for the water to boil.")
  arc = _docs("arc_challenge", "gauntlet/arc_challenge.jsonl")
  assert arc[0].contexts[0] == "Question: Which gas do plants take in to make food?\nAnswer: "
  assert arc[0].fewshot_delimiter == "\n" and arc[0].gold == 1
  wg = _docs("winogrande", "gauntlet/winogrande.jsonl")
  assert wg[1].continuations == (" was going out in the rain.",) * 2 and wg[1].gold == 1
  piqa = _docs("piqa", "gauntlet/piqa.jsonl")
  assert len(piqa) == 3 and piqa[2].contexts[0].endswith("\nAnswer: ")


def test_parquet_rows(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  rows = [json.loads(line) for line in open(os.path.join(FIX, "arc_challenge/test.jsonl"))]
  path = tmp_path / "test.parquet"
  pq.write_table(pa.Table.from_pylist(rows), path)
  docs = mc.parse_docs("arc_challenge", read_rows(str(path)))
  assert [d.gold for d in docs] == [1, 2, 1, 0, 2]
  assert docs[2].where.endswith("test.parquet:row 2")


@pytest.mark.parametrize("task,row,msg", [
    ("winogrande", {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"},
     "exactly one '_'"),
    ("winogrande", {"sentence": "a _ b", "option1": "a", "option2": "b", "answer": "3"},
     "answer must be"),
    ("arc_challenge", {"question": "q", "choices": {"text": ["a"], "label": ["A"]},
                       "answerKey": "B"}, "answerKey 'B'"),
    ("hellaswag", {"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "endings": ["e"] * 4,
                   "label": 7}, "out of range"),
    ("piqa", {"goal": "g", "sol1": "a", "label": 0}, "missing field 'sol2'"),
])
def test_malformed_rows(tmp_path, task, row, msg):
  path = tmp_path / "data.jsonl"
  path.write_text("\n" + json.dumps(row) + "\n")
  with pytest.raises(DataError, match=msg) as e:
    mc.parse_docs(task, read_rows(str(path)))
  assert "data.jsonl:2" in str(e.value)


def test_choose_metrics_differ():
  # Choice 1 has the best total, choice 0 the best per character, choice 2 the best per token.
  preds = mc.choose([-10.0, -9.0, -12.0], [5, 5, 10], ["a" * 20, "b" * 5, "c" * 5])
  assert preds == {"acc": 1, "acc_norm": 0, "acc_per_token": 2}


class FakeScorer:
  """Scores a request by the length of its continuation (shorter = likelier)."""
  add_bos = True

  def __init__(self):
    self.requests = []

  def score(self, requests, progress=None):
    self.requests.extend(requests)
    return [Score(-float(len(c)), max(1, len(c) // 4), False) for _, c in requests]


def test_evaluate_with_fewshot_prefix():
  docs = _docs("arc_challenge", "arc_challenge/test.jsonl")
  pool = _docs("arc_challenge", "arc_challenge/train.jsonl")
  scorer = FakeScorer()
  entries, rows = mc.evaluate_multiple_choice("arc_challenge", scorer, docs, pool, num_fewshot=3)
  assert len(scorer.requests) == sum(len(d.contexts) for d in docs)
  ctx0, cont0 = scorer.requests[0]
  assert ctx0.count("Question:") == 4 and ctx0.count("\n\n") == 3 and cont0 == " oxygen"
  assert ctx0.endswith(
      "\n\nQuestion: Which gas do plants take in from the air to make food?\nAnswer:")
  by = {e["metric"]: e for e in entries}
  assert set(by) == {"acc", "acc_norm", "acc_per_token"}
  assert by["acc_norm"]["settings"]["headline_metric"] == "acc_norm"
  assert by["acc"]["settings"]["num_fewshot"] == 3 and by["acc"]["n"] == 5
  # Shortest continuation wins under acc: gold choices are shortest in docs 3 ("0").
  assert rows[3]["pred_acc"] == 0 and rows[3]["acc"] == 1.0
  assert by["acc"]["value"] == pytest.approx(sum(r["acc"] for r in rows) / 5)
  # --limit keeps the first docs' prompts unchanged.
  s2 = FakeScorer()
  mc.evaluate_multiple_choice("arc_challenge", s2, docs, pool, num_fewshot=3, limit=2)
  assert s2.requests == scorer.requests[:len(s2.requests)]


def test_winogrande_defaults_and_self_excluding_shots():
  docs = _docs("winogrande", "winogrande/validation.jsonl")
  scorer = FakeScorer()
  entries, rows = mc.evaluate_multiple_choice("winogrande", scorer, docs, None, num_fewshot=2)
  assert entries[0]["settings"]["headline_metric"] == "acc"
  for i, d in enumerate(docs):
    ctx = scorer.requests[2 * i][0]
    assert d.shot() not in ctx and ctx.count("\n\n") == 2
  assert mc.DEFAULT_FEWSHOT == {"hellaswag": 0, "arc_challenge": 3, "arc_easy": 3,
                                "winogrande": 5, "piqa": 0}
