"""The demo's five-line verdict, computed from its own numbers (never assumed).

Input: the `results` dict of the demo (see `pipeline`): `runs`, each with `rank` (0 = full FT),
`weight_decay` / `attention_dropout` (> 0: a regularized full-FT run, claim d), `selected` (False
for the LR-grid runs that lost the selection; they are left out here), `targets`, `label`,
`curve` (checkpoints in training order: step, target_acc, source_acc) and `delta_rank` (median /
max rank@90% of dW over every adapted matrix); `diversity` (unique strings per prompt among
sampled generations, claim e); `hidden_size`, `n_target`, `n_source` (held-out set sizes, for
standard errors) and `quick`.

"Low-rank LoRA" is every kept LoRA run on all modules with rank <= hidden_size / 16 (the paper's
ranks 16-256 are 0.4-6% of Llama-2-7B's width 4096). "Full FT" is the kept unregularized run.

  (a) full FT learns more: full FT's final target accuracy exceeds that of every low-rank LoRA
      run by more than 2 standard errors.
  (b) LoRA forgets less: at the end, every low-rank LoRA run keeps more source accuracy than full
      FT, by more than 2 standard errors. Also reported: at matched target accuracy, how many
      low-rank LoRA checkpoints lie above full FT's learning-vs-forgetting paths (every LR tried,
      linearly interpolated between checkpoints, the most favourable crossing for full FT).
  (c) full-FT dW is high rank: the median rank@90% of full FT's dW over all matrices is at least
      10x the smallest LoRA rank used.
  (d) LoRA forgets less than regularized full FT: at the end, every low-rank LoRA run keeps more
      source accuracy than every full-FT run with weight decay or attention dropout, by more than
      2 standard errors; the matched comparison of (b) against the regularized paths is reported,
      and so is whether the regularizers learn and forget as much as plain full FT.
  (e) LoRA keeps generations more diverse: full FT's mean number of unique strings per prompt
      (among n samples at the paper's temperature) is below every low-rank LoRA run's by more than
      2 standard errors of the paired per-prompt difference. Inconclusive when neither the base
      nor those LoRA runs produce diversity to lose (< 1.1 unique strings per prompt).

Every line states its margin: the smallest difference in standard errors (threshold 2), or the
rank ratio (threshold 10x). Each finding is "holds", "does not hold" or "inconclusive" (missing
runs; always in quick mode, whose runs are too short to count as evidence).
"""

from __future__ import annotations

import math
from typing import Sequence

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
Z = 2.0  # standard errors a difference must exceed
RANK_FACTOR = 10
LOW_RANK_FRACTION = 16  # "low rank": rank <= hidden_size / 16, the paper's largest r / width
MIN_MATCH_LEARNING = 0.05  # matched comparisons only where the LoRA checkpoint learned something
MIN_DIVERSITY = 1.1  # unique strings per prompt below which there is no diversity to lose


def _se(p: float, n: int) -> float:
  p = min(max(p, 0.0), 1.0)
  return math.sqrt(max(p * (1 - p), 1.0 / n) / n) if n else float("inf")


def _diff_se(p1: float, p2: float, n: int) -> float:
  return math.sqrt(_se(p1, n) ** 2 + _se(p2, n) ** 2)


def _final(run: dict) -> dict:
  return run["curve"][-1]


def is_regularized(run: dict) -> bool:
  return run["rank"] == 0 and (run.get("weight_decay", 0) > 0
                               or run.get("attention_dropout", 0) > 0)


def _split(results: dict) -> tuple[dict | None, list[dict], list[dict]]:
  runs = [r for r in results["runs"] if r.get("selected", True)]
  full = next((r for r in runs if r["rank"] == 0 and not is_regularized(r)), None)
  lora = [r for r in runs if r["rank"] > 0]
  low = [r for r in lora if r["targets"] == "all" and r["rank"] <= _low_limit(results)]
  return full, lora, low


def _low_limit(results: dict) -> float:
  return results["hidden_size"] / LOW_RANK_FRACTION


def _fmt(x: float) -> str:
  return f"{x:.2f}"


def interpolate_path(path: Sequence[tuple[float, float]], t: float) -> float | None:
  """Source accuracy of a (target, source) path at target accuracy t: the highest value over
  every segment that crosses t (linear interpolation), or None when t is outside the path."""
  best = None
  for (t0, s0), (t1, s1) in zip(path, path[1:]):
    lo, hi = min(t0, t1), max(t0, t1)
    if not lo <= t <= hi:
      continue
    s = max(s0, s1) if t1 == t0 else s0 + (s1 - s0) * (t - t0) / (t1 - t0)
    best = s if best is None else max(best, s)
  if best is None and len(path) == 1 and path[0][0] == t:
    best = path[0][1]
  return best


def matched_comparison(full_runs: Sequence[dict], lora_runs: Sequence[dict]) -> dict:
  """LoRA checkpoints vs full FT at the same target accuracy: the best source accuracy of any
  full-FT run (every LR tried) on its path through its checkpoints."""
  paths = [[(p["target_acc"], p["source_acc"]) for p in r["curve"]] for r in full_runs]
  above, total, gaps = 0, 0, []
  for run in lora_runs:
    for p in run["curve"][1:]:
      if p["target_acc"] < MIN_MATCH_LEARNING:
        continue
      refs = [x for x in (interpolate_path(path, p["target_acc"]) for path in paths)
              if x is not None]
      if not refs:
        continue
      ref = max(refs)
      total += 1
      gaps.append(p["source_acc"] - ref)
      above += p["source_acc"] > ref
  return {"above": above, "total": total,
          "mean_gap": sum(gaps) / len(gaps) if gaps else None}


def matched_text(m: dict, against: str) -> str:
  """The verdict's clause for a `matched_comparison` result against `against`."""
  if not m["total"]:
    return (f"; no low-rank LoRA checkpoint learned enough (target acc >= "
            f"{MIN_MATCH_LEARNING:g}) for a matched comparison")
  text = (f"; at matched target acc (vs {against}), {m['above']}/{m['total']} low-rank LoRA "
          f"checkpoints retain more (mean gap {m['mean_gap']:+.2f})")
  if m["above"] * 2 <= m["total"]:
    text += ": LoRA's retention here comes from learning less"
  return text


def finding_a(results: dict) -> dict:
  full, _, low = _split(results)
  if full is None or not low:
    return {"status": INCONCLUSIVE, "text": "needs a full-FT run and a low-rank LoRA run "
                                            f"(rank <= {_low_limit(results):g})"}
  n = results["n_target"]
  ft = _final(full)["target_acc"]
  parts, margins = [], []
  for r in low:
    lt = _final(r)["target_acc"]
    margins.append((ft - lt) / _diff_se(ft, lt, n))
    parts.append(f"{r['label']} {_fmt(lt)}")
  margin = min(margins)
  text = (f"final target acc: full FT {_fmt(ft)} vs " + ", ".join(parts)
          + f" (low rank: r <= {_low_limit(results):g} = width/{LOW_RANK_FRACTION}, the paper's "
          f"largest rank/width); {margin_text(margin)}")
  return {"status": HOLDS if margin > Z else FAILS, "text": text, "margin_se": margin}


def margin_text(margin: float) -> str:
  return f"margin: smallest gap {margin:.1f} SE (needs > {Z:g})"


def finding_b(results: dict) -> dict:
  full, lora, low = _split(results)
  if full is None or not low:
    return {"status": INCONCLUSIVE, "text": "needs a full-FT run and a low-rank LoRA run "
                                            f"(rank <= {_low_limit(results):g})"}
  n = results["n_source"]
  fs = _final(full)["source_acc"]
  parts, margins = [], []
  for r in low:
    ls = _final(r)["source_acc"]
    margins.append((ls - fs) / _diff_se(fs, ls, n))
    parts.append(f"{r['label']} {_fmt(ls)}")
  margin = min(margins)
  text = (f"final source acc: full FT {_fmt(fs)} vs " + ", ".join(parts)
          + f" ({margin_text(margin)})")
  all_full = [r for r in results["runs"] if r["rank"] == 0 and not is_regularized(r)]
  m = matched_comparison(all_full, low)
  text += matched_text(m, "full FT at any LR tried")
  return {"status": HOLDS if margin > Z else FAILS, "text": text, "matched": m,
          "margin_se": margin}


def finding_c(results: dict) -> dict:
  full, lora, _ = _split(results)
  if full is None or not lora or not full.get("delta_rank"):
    return {"status": INCONCLUSIVE, "text": "needs a full-FT run with its dW analysis and a "
                                            "LoRA run"}
  smallest = min(r["rank"] for r in lora)
  med, top = full["delta_rank"]["median"], full["delta_rank"]["max"]
  ok = med >= RANK_FACTOR * smallest
  ranks = sorted({r["rank"] for r in lora})
  text = (f"full-FT dW rank@90%: median {med:g}, max {top} = {med / smallest:.1f}x the smallest "
          f"LoRA rank ({smallest}); LoRA ranks used: {', '.join(map(str, ranks))} (margin: "
          f"{med / smallest:.1f}x vs the {RANK_FACTOR}x needed)")
  return {"status": HOLDS if ok else FAILS, "text": text, "margin_x": med / smallest}


def finding_d(results: dict) -> dict:
  full, lora, low = _split(results)
  regs = [r for r in results["runs"] if is_regularized(r)]
  if not regs or not low:
    return {"status": INCONCLUSIVE, "text": "needs a regularized full-FT run (weight decay or "
                                            "attention dropout) and a low-rank LoRA run "
                                            f"(rank <= {_low_limit(results):g})"}
  n_s, n_t = results["n_source"], results["n_target"]
  margins = []
  for lo in low:
    ls = _final(lo)["source_acc"]
    for rg in regs:
      rs = _final(rg)["source_acc"]
      margins.append((ls - rs) / _diff_se(ls, rs, n_s))
  margin = min(margins)
  reg_parts = ", ".join(f"{r['label'].replace('full FT + ', '')} {_fmt(_final(r)['target_acc'])}"
                        f"/{_fmt(_final(r)['source_acc'])}" for r in regs)
  low_parts = ", ".join(f"{r['label']} {_fmt(_final(r)['target_acc'])}"
                        f"/{_fmt(_final(r)['source_acc'])}" for r in low)
  text = f"final target/source acc: regularized full FT {reg_parts} vs {low_parts}"
  if full is not None:
    ft, fs = _final(full)["target_acc"], _final(full)["source_acc"]
    same = all(abs(_final(r)["target_acc"] - ft) <= Z * _diff_se(_final(r)["target_acc"], ft, n_t)
               and abs(_final(r)["source_acc"] - fs) <= Z * _diff_se(_final(r)["source_acc"], fs,
                                                                      n_s) for r in regs)
    text += (f" (plain full FT {_fmt(ft)}/{_fmt(fs)}: the regularizers "
             + ("learn and forget as much" if same else "differ from it by > 2 SE somewhere") + ")")
  text += f"; {margin_text(margin)}"
  high = [r for r in lora if r["targets"] == "all" and r not in low]
  if high:
    text += "; higher ranks: " + ", ".join(
        f"{r['label']} {_fmt(_final(r)['target_acc'])}/{_fmt(_final(r)['source_acc'])}"
        for r in high)
  m = matched_comparison(regs, low)
  text += matched_text(m, "any regularized run")
  return {"status": HOLDS if margin > Z else FAILS, "text": text, "matched": m,
          "margin_se": margin}


def paired_gap(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
  """Mean of a_i - b_i and its standard error (at least 1/n: counts are integers)."""
  n = len(a)
  d = [x - y for x, y in zip(a, b)]
  mean = sum(d) / n
  var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
  return mean, max(math.sqrt(var / n), 1.0 / n)


def finding_e(results: dict) -> dict:
  full, _, low = _split(results)
  div = (results.get("diversity") or {}).get("models", {})
  low = [r for r in low if r["name"] in div]
  if full is None or full["name"] not in div or not low or "base" not in div:
    return {"status": INCONCLUSIVE, "text": "needs diversity counts of the base, full FT and a "
                                            "low-rank LoRA run"}
  d = results["diversity"]
  f, base = div[full["name"]], div["base"]

  def show(m):
    return (f"{m['unique_mean']:.2f} ({m['unique_correct_total']} correct + "
            f"{m['unique_incorrect_total']} incorrect unique, {m['correct_fraction']:.2f} correct)")

  text = (f"unique strings per prompt ({d['n_samples']} samples at T={d['temperature']:g}, "
          f"top-p {d['top_p']:g}, {d['n_prompts']} prompts): base {show(base)}, full FT "
          f"{show(f)}, " + ", ".join(f"{r['label']} {show(div[r['name']])}" for r in low))
  others = [m for name, m in div.items() if name not in ("base", full["name"])
            and name not in {r["name"] for r in low}]
  if others:
    text += "; higher ranks: " + ", ".join(f"{m['label']} {m['unique_mean']:.2f}" for m in others)
  if max([base["unique_mean"]] + [div[r["name"]]["unique_mean"] for r in low]) < MIN_DIVERSITY:
    return {"status": INCONCLUSIVE, "text": text + f"; no model compared has > {MIN_DIVERSITY:g} "
                                                   "unique strings per prompt: nothing to lose"}
  margins = []
  for r in low:
    mean, se = paired_gap(div[r["name"]]["per_prompt_unique"], f["per_prompt_unique"])
    margins.append(mean / se)
  margin = min(margins)
  below = f["unique_mean"] < base["unique_mean"]
  above_base = [r["label"] for r in low if div[r["name"]]["unique_mean"] > base["unique_mean"]]
  text += f"; full FT is {'below' if below else 'not below'} the base"
  if above_base:
    text += f", {', '.join(above_base)} above it (not between full FT and the base)"
  lo_cf = [div[r["name"]]["correct_fraction"] for r in low]
  if f["correct_fraction"] - max(lo_cf) > 0.2:
    text += (f"; full FT's samples are {f['correct_fraction']:.2f} correct vs LoRA's "
             f"{min(lo_cf):.2f}-{max(lo_cf):.2f}: with one right answer per prompt, much of its "
             "collapse is learning more (as in (b))")
  text += f"; margin: smallest paired gap {margin:.1f} SE (needs > {Z:g})"
  return {"status": HOLDS if margin > Z else FAILS, "text": text, "margin_se": margin}


TITLES = {"a": "full FT learns more than low-rank LoRA",
          "b": "LoRA forgets less than full FT",
          "c": "full-FT dW is far from low rank",
          "d": "LoRA forgets less than weight decay / dropout",
          "e": "LoRA keeps generations more diverse"}
FINDINGS = {"a": finding_a, "b": finding_b, "c": finding_c, "d": finding_d, "e": finding_e}


def verdict(results: dict) -> dict[str, dict]:
  out = {k: fn(results) for k, fn in FINDINGS.items()}
  if results.get("quick"):
    for f in out.values():
      if f["status"] != INCONCLUSIVE:
        f["measured"] = f["status"]
        f["status"] = INCONCLUSIVE
        f["text"] += f" (quick mode: measured '{f['measured']}', too short to count)"
  return out


def verdict_lines(v: dict[str, dict]) -> list[str]:
  return [f"({k}) {TITLES[k]}: {v[k]['status'].upper()} - {v[k]['text']}" for k in TITLES if k in v]


def summarize(v: dict[str, dict]) -> str:
  held = sum(f["status"] == HOLDS for f in v.values())
  return f"{held}/{len(v)} findings hold"


__all__ = ["verdict", "verdict_lines", "finding_a", "finding_b", "finding_c", "finding_d",
           "finding_e", "matched_comparison", "interpolate_path", "paired_gap", "HOLDS", "FAILS",
           "INCONCLUSIVE"]
