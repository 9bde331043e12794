"""Demo: deterministic domains and their metrics, in-memory batches, the verdict logic, and an
end-to-end `lora-jax demo --quick` run."""

import json
import os

import numpy as np
import pytest

from lora_jax.data.tokenizers import ByteTokenizer
from lora_jax.demo import verdict as V
from lora_jax.demo.data import ExampleBatches, encode_example
from lora_jax.demo.domains import (SKILLS, Example, SourceDomain, TargetDomain,
                                   choice_accuracy, exact_match_accuracy, shift)


# --------------------------------------------------------------------------- domains
def test_source_is_deterministic_by_seed():
  d = SourceDomain(0)
  assert d.train_set(50, seed=3) == d.train_set(50, seed=3)
  assert d.train_set(50, seed=3) != d.train_set(50, seed=4)
  assert d.choice_eval(20, seed=3) == d.choice_eval(20, seed=3)
  assert d.choice_eval(20, seed=3) != d.choice_eval(20, seed=4)
  assert SourceDomain(0).facts == d.facts and SourceDomain(1).facts != d.facts


def test_target_is_deterministic_by_seed_and_table_differs_across_seeds():
  assert TargetDomain(1).train_set(50, 0) == TargetDomain(1).train_set(50, 0)
  assert TargetDomain(1).generation_eval(20, 0) == TargetDomain(1).generation_eval(20, 0)
  assert not np.array_equal(TargetDomain(1).table, TargetDomain(2).table)


def test_source_answers_follow_the_skills_and_facts():
  d = SourceDomain(0)
  kinds = set()
  for ex in d.train_set(300, seed=0):
    if "." in ex.prompt:
      entity, attr = ex.prompt[:-1].split(".")
      assert ex.response == d.facts[entity][attr]
      kinds.add("fact")
    else:
      skill, s = ex.prompt[:-1].split(" ")
      assert skill in d.skills and ex.response == SKILLS[skill](s)
      kinds.add(skill)
  assert kinds == {"fact", "srt", "nxt"}
  assert shift("az09") == "ba10"
  assert shift(shift("hello"), -1) == "hello"


def test_target_answers_follow_the_tables():
  d = TargetDomain(5, n_digits=3)
  assert d.tables.shape == (3, 10, 10)
  for ex in d.train_set(100, seed=0):
    a, b = ex.prompt[:-1].split("*")
    assert len(ex.response) == 3
    assert ex.response == "".join(str(d.tables[i, int(x), int(y)])
                                  for i, (x, y) in enumerate(zip(a, b)))
  shared = TargetDomain(5, n_digits=3, per_position=False)
  assert shared.answer("123", "456") == "".join(
      str(shared.table[int(x), int(y)]) for x, y in zip("123", "456"))


def test_held_out_sets_exclude_training_prompts():
  d = TargetDomain(0, n_digits=2)  # only 10^4 prompts: collisions are likely without exclusion
  train = d.train_set(3000, seed=0)
  held = d.generation_eval(200, seed=0, exclude=[e.prompt for e in train])
  assert not {e.prompt for e in held} & {e.prompt for e in train}
  assert len({e.prompt for e in held}) == 200
  src = SourceDomain(0)
  strain = src.train_set(2000, seed=0)
  items = src.choice_eval(100, seed=0, exclude=[e.prompt for e in strain])
  skill_items = [i for i in items if "." not in i.context]  # facts are asked as trained
  assert skill_items and not {i.context for i in skill_items} & {e.prompt for e in strain}


def test_choice_items_have_one_correct_answer_among_four_distinct_choices():
  d = SourceDomain(0)
  items = d.choice_eval(200, seed=1)
  golds = [it.gold for it in items]
  assert set(golds) == {0, 1, 2, 3}  # the gold position is not a giveaway
  n_facts = 0
  for it in items:
    assert len(it.choices) == 4 and len(set(it.choices)) == 4
    if "." in it.context:
      entity, attr = it.context[:-1].split(".")
      assert it.choices[it.gold] == d.facts[entity][attr]
      n_facts += 1
    else:
      skill, s = it.context[:-1].split(" ")
      assert it.choices[it.gold] == SKILLS[skill](s)
    assert len({len(c) for c in it.choices}) == 1  # acc and acc_norm coincide
  assert 40 < n_facts < 100


def test_metrics_score_an_oracle_one_and_a_wrong_model_zero():
  tgt = TargetDomain(0).generation_eval(50, seed=0)
  assert exact_match_accuracy(tgt, [e.response for e in tgt]) == 1.0
  assert exact_match_accuracy(tgt, [" " + e.response + "\n" for e in tgt]) == 1.0
  assert exact_match_accuracy(tgt, [e.response[::-1] + "0" for e in tgt]) == 0.0
  items = SourceDomain(0).choice_eval(50, seed=0)
  oracle = [[1.0 if i == it.gold else 0.0 for i in range(4)] for it in items]
  wrong = [[0.0 if i == it.gold else 1.0 for i in range(4)] for it in items]
  assert choice_accuracy(items, oracle) == 1.0
  assert choice_accuracy(items, wrong) == 0.0
  with pytest.raises(ValueError):
    choice_accuracy(items, oracle[:-1])


# --------------------------------------------------------------------------- batches
def test_example_batches_mask_only_responses_and_resume_exactly():
  tok = ByteTokenizer()
  exs = SourceDomain(0).train_set(300, seed=0)
  ids, mask = encode_example(Example("rev ab=", "ba"), tok)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert mask == [0] * 8 + [1] * 3
  it = ExampleBatches(exs, tok, seq_len=64, batch_size=4, seed=0)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  after = [next(it) for _ in range(it.batches_per_epoch + 2)]  # crosses an epoch boundary
  it2 = ExampleBatches(exs, tok, seq_len=64, batch_size=4, seed=0)
  it2.set_state(state)
  for a, b in zip(after, [next(it2) for _ in range(len(after))]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  b = first[0]
  assert b["tokens"].shape == (4, 64) and b["tokens"].dtype == np.int32
  # every masked token is a response byte or EOS, never BOS or a prompt token
  tokens, lm = b["tokens"], b["loss_mask"]
  assert not np.any((tokens == tok.bos_id) & (lm == 1))
  assert np.all(lm[b["segment_ids"] == 0] == 0)


# --------------------------------------------------------------------------- verdict
def _run(rank, curve, targets="all", delta=None):
  label = "full FT" if rank == 0 else f"LoRA r={rank}"
  pts = [{"step": 50 * i, "target_acc": t, "source_acc": s} for i, (t, s) in enumerate(curve)]
  return {"rank": rank, "targets": targets, "label": label, "curve": pts,
          "delta_rank": delta}


def _results(full_curve, lora_curves, full_rank=30, quick=False):
  runs = [_run(0, full_curve, delta={"median": full_rank, "max": full_rank + 5})]
  runs += [_run(r, c, delta={"median": r, "max": r}) for r, c in lora_curves.items()]
  return {"runs": runs, "hidden_size": 128, "n_target": 300, "n_source": 300, "quick": quick}


PAPER_LIKE = _results([(0.0, 1.0), (0.5, 0.7), (0.95, 0.45)],
                      {1: [(0.0, 1.0), (0.2, 0.97), (0.35, 0.95)],
                       4: [(0.0, 1.0), (0.3, 0.93), (0.6, 0.85)]})


def test_verdict_all_findings_hold_on_paper_like_numbers():
  v = V.verdict(PAPER_LIKE)
  assert [v[k]["status"] for k in "abc"] == [V.HOLDS] * 3
  # matched: LoRA r=1 at .2/.35 and r=4 at .3/.6 all lie above full FT's path
  assert v["b"]["matched"]["above"] == v["b"]["matched"]["total"] == 4
  lines = V.verdict_lines(v)
  assert len(lines) == 3 and all("HOLDS" in line for line in lines)


def test_verdict_a_fails_when_lora_learns_as_much():
  r = _results([(0.0, 1.0), (0.9, 0.5)], {1: [(0.0, 1.0), (0.2, 0.9)],
                                          4: [(0.0, 1.0), (0.92, 0.9)]})
  assert V.finding_a(r)["status"] == V.FAILS
  assert V.finding_b(r)["status"] == V.HOLDS


def test_verdict_b_fails_when_lora_forgets_as_much_and_reports_matched_gap():
  r = _results([(0.0, 1.0), (0.5, 0.8), (0.95, 0.4)],
               {1: [(0.0, 1.0), (0.5, 0.5), (0.6, 0.42)],
                4: [(0.0, 1.0), (0.5, 0.3), (0.7, 0.2)]})
  b = V.finding_b(r)
  assert b["status"] == V.FAILS
  assert b["matched"]["above"] == 0 and b["matched"]["mean_gap"] < 0
  assert V.finding_a(r)["status"] == V.HOLDS


def test_verdict_differences_within_noise_do_not_count():
  r = _results([(0.0, 1.0), (0.52, 0.60)], {1: [(0.0, 1.0), (0.50, 0.62)]})
  assert V.finding_a(r)["status"] == V.FAILS
  assert V.finding_b(r)["status"] == V.FAILS


def test_verdict_c_needs_ten_times_the_smallest_rank():
  assert V.finding_c(_results([(0, 1), (1, 0)], {1: [(0, 1), (0, 1)]}, full_rank=10))[
      "status"] == V.HOLDS
  assert V.finding_c(_results([(0, 1), (1, 0)], {1: [(0, 1), (0, 1)]}, full_rank=9))[
      "status"] == V.FAILS
  assert V.finding_c(_results([(0, 1), (1, 0)], {4: [(0, 1), (0, 1)]}, full_rank=30))[
      "status"] == V.FAILS


def test_verdict_inconclusive_without_runs_and_in_quick_mode():
  r = _results([(0.0, 1.0), (0.9, 0.5)], {})
  assert all(V.verdict(r)[k]["status"] == V.INCONCLUSIVE for k in "abc")
  q = V.verdict(dict(PAPER_LIKE, quick=True))
  assert all(q[k]["status"] == V.INCONCLUSIVE and q[k]["measured"] == V.HOLDS for k in "abc")


def test_interpolate_path_takes_the_best_crossing():
  path = [(0.0, 1.0), (0.5, 0.5), (0.2, 0.9), (1.0, 0.1)]
  assert V.interpolate_path(path, 0.25) == pytest.approx(0.85)  # crossings .75, .83, .85
  assert V.interpolate_path(path, 1.5) is None


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
  from lora_jax.cli import main
  out = tmp_path / "demo"
  assert main(["demo", "--quick", "--out", str(out)]) == 0
  results = json.loads((out / "results.json").read_text())
  assert set(results["verdict"]) == {"a", "b", "c"}
  assert all(f["status"] == V.INCONCLUSIVE for f in results["verdict"].values())
  names = {r["name"] for r in results["runs"]}
  assert any(n.startswith("full_") for n in names) and any(n.startswith("lora_r") for n in names)
  for r in results["runs"]:
    assert r["curve"][0]["step"] == 0 and r["curve"][-1]["step"] == results["settings"][
        "finetune_steps"]
    if r["selected"]:
      assert r["delta_rank"]["max"] >= 1
  report = (out / "report.md").read_text()
  assert "## Verdict" in report
  for name in results["figures"].values():
    assert (out / name).stat().st_size > 1000
    assert name in report
  assert {"pareto", "learning", "rank", "spectra"} <= set(results["figures"])
  # a second run reuses the base model when its settings match
  assert main(["demo", "--quick", "--out", str(out)]) == 0
  again = json.loads((out / "results.json").read_text())
  assert again["timings"]["base"]["reused"] is True
  assert again["base"] == results["base"]
  assert os.path.exists(out / "base" / "base_params.pkl")
