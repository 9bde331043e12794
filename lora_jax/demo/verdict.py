"""The demo's three-line verdict, computed from its own numbers (never assumed).

Input: the `results` dict of the demo (see `pipeline`): `runs`, each with `rank` (0 = full FT),
`selected` (False for the LR-grid runs that lost the selection; they are left out here),
`targets`, `label`, `curve` (checkpoints in training order: step, target_acc, source_acc) and
`delta_rank` (median / max rank@90% of dW over every adapted matrix); `hidden_size`, `n_target`,
`n_source` (held-out set sizes, for standard errors) and `quick`.

  (a) full FT learns more: full FT's final target accuracy exceeds that of every low-rank LoRA
      run (all modules, rank <= hidden_size / 16: the paper's ranks 16-256 are 0.4-6% of
      Llama-2-7B's width 4096) by more than 2 standard errors.
  (b) LoRA forgets less: at the end, every low-rank LoRA run keeps more source accuracy than full
      FT, by more than 2 standard errors. Also reported: at matched target accuracy, how many
      low-rank LoRA checkpoints lie above full FT's learning-vs-forgetting paths (every LR tried,
      linearly interpolated between checkpoints, the most favourable crossing for full FT).
  (c) full-FT dW is high rank: the median rank@90% of full FT's dW over all matrices is at least
      10x the smallest LoRA rank used.

Each finding is "holds", "does not hold" or "inconclusive" (missing runs; always in quick mode,
whose runs are too short to count as evidence).
"""

from __future__ import annotations

import math
from typing import Sequence

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
Z = 2.0  # standard errors a difference must exceed
RANK_FACTOR = 10
LOW_RANK_FRACTION = 16  # "low rank": rank <= hidden_size / 16, the paper's largest r / width
MIN_MATCH_LEARNING = 0.05  # matched comparisons only where the LoRA checkpoint learned something


def _se(p: float, n: int) -> float:
  p = min(max(p, 0.0), 1.0)
  return math.sqrt(max(p * (1 - p), 1.0 / n) / n) if n else float("inf")


def _diff_se(p1: float, p2: float, n: int) -> float:
  return math.sqrt(_se(p1, n) ** 2 + _se(p2, n) ** 2)


def _final(run: dict) -> dict:
  return run["curve"][-1]


def _split(results: dict) -> tuple[dict | None, list[dict], list[dict]]:
  runs = [r for r in results["runs"] if r.get("selected", True)]
  full = next((r for r in runs if r["rank"] == 0), None)
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


def finding_a(results: dict) -> dict:
  full, _, low = _split(results)
  if full is None or not low:
    return {"status": INCONCLUSIVE, "text": "needs a full-FT run and a low-rank LoRA run "
                                            f"(rank <= {_low_limit(results):g})"}
  n = results["n_target"]
  ft = _final(full)["target_acc"]
  parts, ok = [], True
  for r in low:
    lt = _final(r)["target_acc"]
    ok &= (ft - lt) > Z * _diff_se(ft, lt, n)
    parts.append(f"{r['label']} {_fmt(lt)}")
  text = (f"final target acc: full FT {_fmt(ft)} vs " + ", ".join(parts)
          + f" (low rank: r <= {_low_limit(results):g} = width/{LOW_RANK_FRACTION}, the paper's "
          "largest rank/width)")
  return {"status": HOLDS if ok else FAILS, "text": text}


def finding_b(results: dict) -> dict:
  full, lora, low = _split(results)
  if full is None or not low:
    return {"status": INCONCLUSIVE, "text": "needs a full-FT run and a low-rank LoRA run "
                                            f"(rank <= {_low_limit(results):g})"}
  n = results["n_source"]
  fs = _final(full)["source_acc"]
  parts, ok = [], True
  for r in low:
    ls = _final(r)["source_acc"]
    ok &= (ls - fs) > Z * _diff_se(fs, ls, n)
    parts.append(f"{r['label']} {_fmt(ls)}")
  text = f"final source acc: full FT {_fmt(fs)} vs " + ", ".join(parts)
  all_full = [r for r in results["runs"] if r["rank"] == 0]
  m = matched_comparison(all_full, low)
  if m["total"]:
    text += (f"; at matched target acc (vs full FT at any LR tried), {m['above']}/{m['total']} "
             f"low-rank LoRA checkpoints retain more (mean gap {m['mean_gap']:+.2f})")
    if m["above"] * 2 <= m["total"]:
      text += ": LoRA's retention here comes from learning less"
  else:
    text += (f"; no low-rank LoRA checkpoint learned enough (target acc >= "
             f"{MIN_MATCH_LEARNING:g}) for a matched comparison")
  return {"status": HOLDS if ok else FAILS, "text": text, "matched": m}


def finding_c(results: dict) -> dict:
  full, lora, _ = _split(results)
  if full is None or not lora or not full.get("delta_rank"):
    return {"status": INCONCLUSIVE, "text": "needs a full-FT run with its dW analysis and a "
                                            "LoRA run"}
  smallest = min(r["rank"] for r in lora)
  med, top = full["delta_rank"]["median"], full["delta_rank"]["max"]
  ok = med >= RANK_FACTOR * smallest
  ranks = sorted({r["rank"] for r in lora})
  text = (f"full-FT dW rank@90%: median {med:g}, max {top} = {med / smallest:.0f}x the smallest "
          f"LoRA rank ({smallest}); LoRA ranks used: {', '.join(map(str, ranks))}")
  return {"status": HOLDS if ok else FAILS, "text": text}


TITLES = {"a": "full FT learns more than low-rank LoRA",
          "b": "LoRA forgets less than full FT",
          "c": "full-FT dW is far from low rank"}


def verdict(results: dict) -> dict[str, dict]:
  out = {"a": finding_a(results), "b": finding_b(results), "c": finding_c(results)}
  if results.get("quick"):
    for f in out.values():
      if f["status"] != INCONCLUSIVE:
        f["measured"] = f["status"]
        f["status"] = INCONCLUSIVE
        f["text"] += f" (quick mode: measured '{f['measured']}', too short to count)"
  return out


def verdict_lines(v: dict[str, dict]) -> list[str]:
  return [f"({k}) {TITLES[k]}: {v[k]['status'].upper()} - {v[k]['text']}" for k in ("a", "b", "c")]


def summarize(v: dict[str, dict]) -> str:
  held = sum(f["status"] == HOLDS for f in v.values())
  return f"{held}/3 findings hold"


__all__ = ["verdict", "verdict_lines", "finding_a", "finding_b", "finding_c",
           "matched_comparison", "interpolate_path", "HOLDS", "FAILS", "INCONCLUSIVE"]
