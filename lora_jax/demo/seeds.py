"""`lora-jax demo --seeds 0,1`: the demo once per seed, then each metric as a range over the seeds
and each verdict line with its status per seed (a finding whose status differs is flagged).

Writes `<out>/seed_<k>/` (each seed's full demo output), `<out>/seeds.json` and `<out>/seeds.md`.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from lora_jax.fileio import atomic_write_json, atomic_write_text


def _run_metrics(r: dict) -> dict:
  end = r["curve"][-1]
  out = {"lr": r["lr"], "target_acc": end["target_acc"], "source_acc": end["source_acc"]}
  if r.get("delta_rank"):
    out["delta_rank_median"] = r["delta_rank"]["median"]
  return out


def metrics_by_key(results: dict) -> dict[str, dict]:
  """{run label: {metric: value}} for the kept runs, plus the base and the diversity counts."""
  out = {"base": {"target_acc": results["base"]["target_acc"],
                  "source_acc": results["base"]["source_acc"]}}
  for r in results["runs"]:
    if r.get("selected", True):
      out[r["label"]] = _run_metrics(r)
  for name, m in ((results.get("diversity") or {}).get("models") or {}).items():
    out.setdefault(m["label"], {})["unique_per_prompt"] = m["unique_mean"]
  return out


def summarize_seeds(per_seed: dict[int, dict]) -> dict:
  """Ranges of every metric over the seeds and the verdict statuses per seed."""
  seeds = sorted(per_seed)
  metrics = {s: metrics_by_key(per_seed[s]) for s in seeds}
  keys = list(dict.fromkeys(k for s in seeds for k in metrics[s]))
  ranges: dict[str, dict] = {}
  for k in keys:
    names = list(dict.fromkeys(m for s in seeds for m in metrics[s].get(k, {})))
    for m in names:
      vals = [metrics[s][k][m] for s in seeds if m in metrics[s].get(k, {})]
      ranges.setdefault(k, {})[m] = {"min": min(vals), "max": max(vals), "values": vals}
  findings = {}
  for f in per_seed[seeds[0]]["verdict"]:
    statuses = [per_seed[s]["verdict"][f]["status"] for s in seeds]
    margins = [per_seed[s]["verdict"][f].get("margin_se", per_seed[s]["verdict"][f].get(
        "margin_x")) for s in seeds]
    findings[f] = {"statuses": statuses, "flips": len(set(statuses)) > 1, "margins": margins}
  r0 = per_seed[seeds[0]]
  return {"seeds": seeds, "ranges": ranges, "findings": findings,
          "cpu_model": r0["environment"].get("cpu_model"),
          "cpu_count": r0["environment"].get("cpu_count"),
          "timings": {s: per_seed[s]["timings"] for s in seeds}}


def _rng(d: dict | None, fmt: str = "{:.3f}") -> str:
  if not d:
    return "–"
  lo, hi = fmt.format(d["min"]), fmt.format(d["max"])
  return lo if lo == hi else f"{lo}–{hi}"


def summary_lines(summary: dict) -> list[str]:
  from lora_jax.demo.verdict import TITLES
  seeds = summary["seeds"]
  lines = [f"Seeds {', '.join(map(str, seeds))} on {summary['cpu_count']} CPU cores "
           f"({summary['cpu_model']}); ranges are min–max over the seeds.", "",
           "| run | peak LR | target acc (learning) | source acc (forgetting) | "
           "ΔW rank@90% median | unique strings / prompt |", "|---|---|---|---|---|---|"]
  for k, m in summary["ranges"].items():
    lines.append(f"| {k} | {_rng(m.get('lr'), '{:g}')} | {_rng(m.get('target_acc'))} | "
                 f"{_rng(m.get('source_acc'))} | {_rng(m.get('delta_rank_median'), '{:g}')} | "
                 f"{_rng(m.get('unique_per_prompt'), '{:.2f}')} |")
  lines += ["", "Verdict per seed:", ""]
  for f, v in summary["findings"].items():
    margins = ", ".join("–" if x is None else f"{x:.1f}" for x in v["margins"])
    lines.append(f"- ({f}) {TITLES[f]}: {' / '.join(s.upper() for s in v['statuses'])}"
                 + (" — FLIPS between seeds" if v["flips"] else "")
                 + f" (margins {margins}{'x' if f == 'c' else ' SE'})")
  lines += ["", "Time per seed (wall / CPU s): " + ", ".join(
      f"seed {s} {t['total']['wall_s']:.0f} / {t['total']['cpu_s']:.0f}"
      for s, t in summary["timings"].items())]
  return lines


def run_seeds(make_settings: Callable[[int], object], seeds: Sequence[int], out_dir: str,
              echo: Callable[[str], None] = print) -> dict:
  from lora_jax.demo.pipeline import run_demo
  from lora_jax.demo.verdict import verdict_lines
  per_seed = {}
  for seed in seeds:
    echo(f"=== seed {seed} ===")
    per_seed[seed] = run_demo(make_settings(seed), os.path.join(out_dir, f"seed_{seed}"), echo)
    for line in verdict_lines(per_seed[seed]["verdict"]):
      echo("  " + line)
  summary = summarize_seeds(per_seed)
  atomic_write_json(os.path.join(out_dir, "seeds.json"), summary, indent=1)
  atomic_write_text(os.path.join(out_dir, "seeds.md"),
                    "# lora-jax demo over seeds\n\n" + "\n".join(summary_lines(summary)) + "\n")
  return summary
