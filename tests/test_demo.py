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


def test_finetune_rows_without_padding_hold_the_same_samples():
  """The demo finetunes on rows of 52 tokens (4 whole target samples) instead of 64: the batches
  carry the same samples in the same rows, only the padding goes."""
  tok = ByteTokenizer()
  exs = TargetDomain(0).train_set(500, seed=0)
  assert {len(encode_example(e, tok)[0]) for e in exs} == {13}
  a = ExampleBatches(exs, tok, seq_len=64, batch_size=8, seed=2)
  b = ExampleBatches(exs, tok, seq_len=52, batch_size=8, seed=2)
  assert a.batches_per_epoch == b.batches_per_epoch
  for _ in range(a.batches_per_epoch + 1):
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x["tokens"][:, :52], y["tokens"])
    np.testing.assert_array_equal(x["loss_mask"][:, :52], y["loss_mask"])
    assert not x["segment_ids"][:, 52:].any()  # the cut columns were padding


def test_example_batches_share_packed_epochs_through_a_cache():
  tok = ByteTokenizer()
  exs = TargetDomain(0).train_set(300, seed=0)
  cache = {}
  plain = ExampleBatches(exs, tok, seq_len=52, batch_size=8, seed=2)
  first = ExampleBatches(exs, tok, seq_len=52, batch_size=8, seed=2, cache=cache)
  a = [next(first) for _ in range(2 * first.batches_per_epoch + 1)]
  second = ExampleBatches(exs, tok, seq_len=52, batch_size=8, seed=2, cache=cache)
  assert second._docs is first._docs and ("epoch", 1) in cache
  for x, y, z in zip(a, [next(second) for _ in range(len(a))], [next(plain) for _ in a]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
      np.testing.assert_array_equal(x[k], z[k])
  with pytest.raises(ValueError):
    a[0]["tokens"][0, 0] = 1  # shared rows are read-only


# --------------------------------------------------------------------------- verdict
def _run(rank, curve, targets="all", delta=None, weight_decay=0.0, attention_dropout=0.0):
  label = "full FT" if rank == 0 else f"LoRA r={rank}"
  if weight_decay or attention_dropout:
    label += f" + wd {weight_decay:g}" if weight_decay else f" + attn dropout {attention_dropout:g}"
  pts = [{"step": 50 * i, "target_acc": t, "source_acc": s} for i, (t, s) in enumerate(curve)]
  return {"rank": rank, "targets": targets, "label": label, "curve": pts, "name": label, "lr": 1e-3,
          "delta_rank": delta, "weight_decay": weight_decay,
          "attention_dropout": attention_dropout,
          "role": "regularizer" if weight_decay or attention_dropout else "lora"}


def _diversity(per_prompt: dict, n_samples=50):
  """{name: per-prompt unique counts} -> results["diversity"]."""
  models = {}
  for name, counts in per_prompt.items():
    models[name] = {"label": name, "rank": 0, "unique_mean": sum(counts) / len(counts),
                    "unique_total": sum(counts), "unique_correct_total": 0,
                    "unique_incorrect_total": sum(counts), "correct_fraction": 0.0,
                    "per_prompt_unique": list(counts)}
  return {"n_prompts": len(next(iter(per_prompt.values()))), "n_samples": n_samples,
          "temperature": 0.2, "top_p": 0.95, "models": models}


def _results(full_curve, lora_curves, full_rank=30, quick=False, regs=None, diversity=None):
  runs = [_run(0, full_curve, delta={"median": full_rank, "max": full_rank + 5})]
  runs += [_run(r, c, delta={"median": r, "max": r}) for r, c in lora_curves.items()]
  for (wd, p), c in (regs or {}).items():
    runs.append(_run(0, c, weight_decay=wd, attention_dropout=p))
  out = {"runs": runs, "hidden_size": 128, "n_target": 300, "n_source": 300, "quick": quick}
  if diversity is not None:
    out["diversity"] = _diversity(diversity)
  return out


REGS_LIKE_FULL = {(3e-4, 0.0): [(0.0, 1.0), (0.5, 0.7), (0.93, 0.46)],
                  (0.0, 0.1): [(0.0, 1.0), (0.45, 0.72), (0.93, 0.47)]}
DIVERSE = {"base": [6, 5, 7, 6] * 10, "full FT": [1, 1, 2, 1] * 10,
           "LoRA r=1": [5, 4, 6, 5] * 10, "LoRA r=4": [3, 2, 4, 3] * 10}
PAPER_LIKE = _results([(0.0, 1.0), (0.5, 0.7), (0.95, 0.45)],
                      {1: [(0.0, 1.0), (0.2, 0.97), (0.35, 0.95)],
                       4: [(0.0, 1.0), (0.3, 0.93), (0.6, 0.85)]},
                      regs=REGS_LIKE_FULL, diversity=DIVERSE)


def test_verdict_all_findings_hold_on_paper_like_numbers():
  v = V.verdict(PAPER_LIKE)
  assert [v[k]["status"] for k in "abcde"] == [V.HOLDS] * 5
  # matched: LoRA r=1 at .2/.35 and r=4 at .3/.6 all lie above full FT's path
  assert v["b"]["matched"]["above"] == v["b"]["matched"]["total"] == 4
  # ... and above the regularized paths (which learn and forget as plain full FT does)
  assert v["d"]["matched"]["above"] == v["d"]["matched"]["total"] == 4
  assert "learn and forget as much" in v["d"]["text"]
  lines = V.verdict_lines(v)
  assert len(lines) == 5 and all("HOLDS" in line for line in lines)
  assert [line[:3] for line in lines] == ["(a)", "(b)", "(c)", "(d)", "(e)"]
  assert all("margin" in line for line in lines)
  assert v["b"]["margin_se"] > 2 and v["c"]["margin_x"] == 30
  assert V.summarize(v) == "5/5 findings hold"


def test_verdict_full_ft_is_the_unregularized_run():
  # a regularized run listed first must not stand in for full FT in (a)-(c)
  r = dict(PAPER_LIKE, runs=PAPER_LIKE["runs"][3:] + PAPER_LIKE["runs"][:3])
  assert [V.verdict(r)[k]["status"] for k in "abcde"] == [V.HOLDS] * 5
  assert "full FT 0.95" in V.finding_a(r)["text"]


def test_verdict_d_fails_when_a_regularizer_retains_as_much_as_lora():
  regs = dict(REGS_LIKE_FULL)
  regs[(0.0, 0.05)] = [(0.0, 1.0), (0.1, 0.97), (0.3, 0.96)]  # learns little, forgets little
  r = _results([(0.0, 1.0), (0.5, 0.7), (0.95, 0.45)],
               {1: [(0.0, 1.0), (0.2, 0.97), (0.35, 0.95)],
                4: [(0.0, 1.0), (0.3, 0.93), (0.6, 0.85)]}, regs=regs)
  d = V.finding_d(r)
  assert d["status"] == V.FAILS and d["margin_se"] < 2
  assert "differ from it" in d["text"]  # this regularizer does not behave like full FT


def test_verdict_d_reports_when_lora_retention_comes_from_learning_less():
  regs = {(3e-4, 0.0): [(0.0, 1.0), (0.2, 0.98), (0.9, 0.5)]}
  r = _results([(0.0, 1.0), (0.9, 0.5)], {1: [(0.0, 1.0), (0.2, 0.9), (0.3, 0.85)]}, regs=regs)
  d = V.finding_d(r)
  assert d["status"] == V.HOLDS  # at the end LoRA keeps more ...
  assert d["matched"]["above"] == 0 and "learning less" in d["text"]  # ... by learning less


def test_verdict_d_and_e_inconclusive_without_their_runs():
  r = _results([(0.0, 1.0), (0.9, 0.5)], {1: [(0.0, 1.0), (0.2, 0.9)]})
  assert V.finding_d(r)["status"] == V.INCONCLUSIVE
  assert V.finding_e(r)["status"] == V.INCONCLUSIVE
  # no diversity anywhere (every model repeats one string): nothing to collapse
  flat = _results([(0.0, 1.0), (0.9, 0.5)], {1: [(0.0, 1.0), (0.2, 0.9)]},
                  diversity={"base": [1] * 20, "full FT": [1] * 20, "LoRA r=1": [1] * 19 + [2]})
  e = V.finding_e(flat)
  assert e["status"] == V.INCONCLUSIVE and "nothing to lose" in e["text"]


def test_verdict_e_fails_when_lora_is_as_collapsed_as_full_ft():
  div = dict(DIVERSE, **{"LoRA r=4": [1, 1, 2, 1] * 9 + [1, 1, 2, 2]})
  r = dict(PAPER_LIKE, diversity=_diversity(div))
  e = V.finding_e(r)
  assert e["status"] == V.FAILS and 0 < e["margin_se"] < 2
  assert "below the base" in e["text"]
  # a gap of 0.1 unique strings on 10 prompts is within noise
  noisy = dict(PAPER_LIKE, diversity=_diversity({
      "base": [3] * 10, "full FT": [2, 3] * 5, "LoRA r=1": [3, 2] * 4 + [3, 3],
      "LoRA r=4": [3, 2] * 4 + [3, 3]}))
  assert V.finding_e(noisy)["status"] == V.FAILS


def test_paired_gap():
  mean, se = V.paired_gap([3, 4, 5, 6], [1, 2, 3, 4])
  assert mean == 2 and se == pytest.approx(0.25)  # constant difference: the 1/n floor
  mean, se = V.paired_gap([2, 0], [0, 0])
  assert mean == 1 and se == pytest.approx(1.0)


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
  assert all(V.verdict(r)[k]["status"] == V.INCONCLUSIVE for k in "abcde")
  q = V.verdict(dict(PAPER_LIKE, quick=True))
  assert all(q[k]["status"] == V.INCONCLUSIVE and q[k]["measured"] == V.HOLDS for k in "abcde")


def test_interpolate_path_takes_the_best_crossing():
  path = [(0.0, 1.0), (0.5, 0.5), (0.2, 0.9), (1.0, 0.1)]
  assert V.interpolate_path(path, 0.25) == pytest.approx(0.85)  # crossings .75, .83, .85
  assert V.interpolate_path(path, 1.5) is None


# --------------------------------------------------------------------------- diversity, seeds
def test_diversity_counts_split_correct_and_incorrect():
  from lora_jax.demo.evaluate import diversity_counts
  exs = [Example("12*34=", "567"), Example("99*00=", "123")]
  samples = [["567", " 567", "568", "568\n", "000"], ["123", "123", "123", "123", "123"]]
  c = diversity_counts(exs, samples)
  assert c["per_prompt_unique"] == [3, 1]  # whitespace is ignored, as exact match ignores it
  assert c["unique_correct_total"] == 2  # at most one correct string per prompt
  assert c["unique_incorrect_total"] == 2  # "568", "000"
  assert c["unique_total"] == 4 and c["unique_mean"] == 2.0
  assert c["correct_fraction"] == pytest.approx(7 / 10)
  with pytest.raises(ValueError):
    diversity_counts(exs, samples[:1])


def test_seed_summary_ranges_and_flips():
  from lora_jax.demo.seeds import summarize_seeds, summary_lines
  a = dict(PAPER_LIKE, base={"target_acc": 0.0, "source_acc": 1.0},
           environment={"cpu_model": "AMD EPYC", "cpu_count": 2},
           timings={"total": {"wall_s": 400.0, "cpu_s": 600.0}})
  a["verdict"] = V.verdict(a)
  b = _results([(0.0, 1.0), (0.5, 0.7), (0.95, 0.45)],
               {1: [(0.0, 1.0), (0.2, 0.6), (0.35, 0.46)],  # forgets as much as full FT
                4: [(0.0, 1.0), (0.3, 0.93), (0.6, 0.85)]}, regs=REGS_LIKE_FULL,
               diversity=DIVERSE)
  b.update(base={"target_acc": 0.0, "source_acc": 0.98}, environment=a["environment"],
           timings=a["timings"])
  b["verdict"] = V.verdict(b)
  summary = summarize_seeds({0: a, 1: b})
  assert summary["findings"]["a"]["flips"] is False
  assert summary["findings"]["b"]["flips"] is True
  assert summary["findings"]["b"]["statuses"] == [V.HOLDS, V.FAILS]
  assert summary["ranges"]["LoRA r=1"]["source_acc"]["min"] == 0.46
  assert summary["ranges"]["base"]["source_acc"] == {"min": 0.98, "max": 1.0,
                                                     "values": [1.0, 0.98]}
  text = "\n".join(summary_lines(summary))
  assert "FLIPS between seeds" in text and "0.980–1.000" in text and "AMD EPYC" in text


def test_demo_refuses_an_out_dir_with_foreign_files(tmp_path, capsys):
  from lora_jax.cli import main
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  assert main(["demo", "--quick", "--out", str(out)]) == 2
  assert "notes.txt" in capsys.readouterr().err
  assert sorted(os.listdir(out)) == ["notes.txt"]  # nothing was written


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
  from lora_jax.cli import main
  out = tmp_path / "demo"
  assert main(["demo", "--quick", "--out", str(out)]) == 0
  results = json.loads((out / "results.json").read_text())
  assert set(results["verdict"]) == {"a", "b", "c", "d", "e"}
  assert all(f["status"] == V.INCONCLUSIVE for f in results["verdict"].values())
  assert len(V.verdict_lines(results["verdict"])) == 5
  names = {r["name"] for r in results["runs"]}
  assert any(n.startswith("full_") for n in names) and any(n.startswith("lora_r") for n in names)
  regs = [r for r in results["runs"] if r["role"] == "regularizer"]
  assert {bool(r["weight_decay"]) for r in regs} == {True, False}  # decay and dropout runs
  assert all(r["lr"] == results["regularizers"]["lr"] for r in regs)
  for r in results["runs"]:
    assert r["curve"][0]["step"] == 0 and r["curve"][-1]["step"] == results["settings"][
        "finetune_steps"]
    if r["selected"] and r["role"] != "regularizer":
      assert r["delta_rank"]["max"] >= 1
  div = results["diversity"]
  assert "base" in div["models"] and len(div["models"]) >= 3
  for m in div["models"].values():
    assert len(m["per_prompt_unique"]) == div["n_prompts"]
    assert all(1 <= u <= div["n_samples"] for u in m["per_prompt_unique"])
  assert {"base", "finetune", "regularizers", "diversity", "analyze", "report", "total"} <= set(
      results["timings"])
  assert all("cpu_s" in t for t in results["timings"].values())
  report = (out / "report.md").read_text()
  assert "## Verdict" in report
  for name in results["figures"].values():
    assert (out / name).stat().st_size > 1000
    assert name in report
  assert {"pareto", "learning", "rank", "spectra", "regularizers", "diversity"} <= set(
      results["figures"])
  assert "## Claim (d)" in report and "## Claim (e)" in report
  # a second run reuses the base model when its settings match
  assert main(["demo", "--quick", "--out", str(out)]) == 0
  again = json.loads((out / "results.json").read_text())
  assert again["timings"]["base"]["reused"] is True
  assert again["base"] == results["base"]
  assert os.path.exists(out / "base" / "base_params.pkl")
