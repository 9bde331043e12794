"""Benchmark: the SVDs of one Llama-2-7B layer's weights, jnp (as `lora-jax analyze` runs them) vs
numpy, and the exact LoRA factor SVD vs the dense SVD of s·A·B.

    nice python benchmarks/svd.py                    # full 7B shapes (minutes on a small CPU)
    python benchmarks/svd.py --scale 8 --reps 2      # 1/8 of every dimension: a smoke run

Layer set, random Gaussian float32 weights in Linen layout [in, out]:
  attention q, k, v, o: 4 x [4096, 4096]        (one vmapped call over the stack, as analyze does)
  MLP gate, up:         2 x [4096, 11008]        (one vmapped call)
  MLP down:             1 x [11008, 4096]
Singular values only (`compute_uv=False`) for both libraries, on the same matrices. jnp calls are
compiled ahead of time (`jit(...).lower(...).compile()`), so timings exclude compilation; the
compile time is reported separately. Factor SVD: A [4096, r], B [r, 11008], scale 2, r in {16, 256}:
dense = SVD of the formed 4096 x 11008 product; factor = QR of A and B^T + an r x r SVD.

Prints a table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora_jax.analysis import spectra  # noqa: E402


def _aot(fn, *args):
  t = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - t


CPU_TIMES: list[float] = []  # process CPU seconds of each `_time` call's best repetition


def _time(fn, reps):
  """Best wall time over `reps` (and its process CPU time, appended to CPU_TIMES: on a shared,
  loaded machine CPU time is the steadier measure of work; wall time includes waiting)."""
  best, best_cpu = float("inf"), 0.0
  out = None
  for _ in range(reps):
    t, c = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn())
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    if wall < best:
      best, best_cpu = wall, cpu
  CPU_TIMES.append(best_cpu)
  return best, out


def _rel_diff(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _svals(w_LxMxN):  # what `lora-jax analyze` runs (wide matrices are transposed first)
  return jax.vmap(spectra.svals)(w_LxMxN)


def _svals_naive(w_LxMxN):  # jnp.linalg.svd on the matrix as stored
  return jax.vmap(lambda w: jnp.linalg.svd(w, compute_uv=False))(w_LxMxN)


def bench_layer_set(d: int, f: int, reps: int, numpy_too: bool, untransposed: bool = False,
                    seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  groups = [("q,k,v,o_proj", 4, (d, d)), ("gate,up_proj", 2, (d, f)), ("down_proj", 1, (f, d))]
  rows = []
  for name, count, (m, n) in groups:
    w = (rng.standard_normal((count, m, n), dtype=np.float32) * 0.02)
    w_dev = jnp.asarray(w)
    compiled, t_compile = _aot(_svals, w_dev)
    t_jnp, s_jnp = _time(lambda: compiled(w_dev), reps)
    row = {"group": name, "count": count, "shape": [m, n], "jnp_s": t_jnp,
           "jnp_cpu_s": CPU_TIMES[-1], "jnp_compile_s": t_compile}
    if untransposed and m < n:  # wide: the untransposed call, to show why analyze transposes
      naive, _ = _aot(_svals_naive, w_dev)
      row["jnp_untransposed_s"], _ = _time(lambda: naive(w_dev), reps)
      row["jnp_untransposed_cpu_s"] = CPU_TIMES[-1]
    if numpy_too:
      t_np, s_np = _time(lambda: np.linalg.svd(w, compute_uv=False), reps)
      row.update(numpy_s=t_np, numpy_cpu_s=CPU_TIMES[-1], numpy_over_jnp=t_np / t_jnp,
                 max_rel_diff=_rel_diff(s_jnp, s_np))
    rows.append(row)
    print(f"  {name:<13} {count} x {m}x{n}: jnp {t_jnp:8.2f}s (cpu {row['jnp_cpu_s']:.2f}s)"
          + (f"  jnp untransposed {row['jnp_untransposed_s']:8.2f}s"
             if "jnp_untransposed_s" in row else "")
          + (f"  numpy {row['numpy_s']:8.2f}s (cpu {row['numpy_cpu_s']:.2f}s)" if numpy_too else ""),
          flush=True)
  return rows


def bench_factor(d: int, f: int, ranks, reps: int, seed: int = 1) -> list[dict]:
  rng = np.random.default_rng(seed)
  rows = []
  scale = jnp.float32(2.0)
  for r in ranks:
    a = jnp.asarray(rng.standard_normal((1, d, r), dtype=np.float32) / np.sqrt(d))
    b = jnp.asarray(rng.standard_normal((1, r, f), dtype=np.float32) * 0.01)
    dense_fn = lambda a, b, s: _svals(s * jnp.einsum("lmr,lrn->lmn", a, b))
    dense, tc_dense = _aot(dense_fn, a, b, scale)
    factor, tc_factor = _aot(spectra._factor_svals_LxR, a, b, scale)
    t_dense, s_dense = _time(lambda: dense(a, b, scale), reps)
    cpu_dense = CPU_TIMES[-1]
    t_factor, s_factor = _time(lambda: factor(a, b, scale), reps)
    s_dense = np.asarray(s_dense)[0, :r]
    rows.append({"rank": r, "shape": [d, f], "dense_s": t_dense, "factor_s": t_factor,
                 "dense_cpu_s": cpu_dense, "factor_cpu_s": CPU_TIMES[-1],
                 "speedup": t_dense / t_factor, "dense_compile_s": tc_dense,
                 "factor_compile_s": tc_factor,
                 "max_rel_diff": _rel_diff(np.asarray(s_factor)[0], s_dense)})
    print(f"  r={r:<4} dense {t_dense:8.2f}s  factor {t_factor:8.4f}s", flush=True)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--scale", type=int, default=1, help="divide every dimension by this (smoke runs)")
  p.add_argument("--reps", type=int, default=1, help="repetitions; the best time is kept")
  p.add_argument("--ranks", default="16,256")
  p.add_argument("--skip-numpy", action="store_true")
  p.add_argument("--skip-layer-set", action="store_true")
  p.add_argument("--untransposed", action="store_true",
                 help="also time jnp's SVD of the wide gate/up kernels as stored (slow)")
  p.add_argument("--out", default="svd_benchmark.json")
  args = p.parse_args(argv)
  d, f = 4096 // args.scale, 11008 // args.scale
  ranks = [max(1, int(r) // args.scale) for r in args.ranks.split(",") if r]
  info = {"backend": jax.default_backend(), "devices": [str(x) for x in jax.devices()],
          "jax": jax.__version__, "numpy": np.__version__, "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg()),
          "scale": args.scale, "reps": args.reps, "dims": [d, f]}
  print(f"backend={info['backend']} cpus={info['cpu_count']} load={info['loadavg_start']} "
        f"dims={d}x{f} reps={args.reps}", flush=True)
  result = {"info": info}
  if not args.skip_layer_set:
    print("layer set (singular values only):", flush=True)
    result["layer_set"] = bench_layer_set(d, f, args.reps, not args.skip_numpy, args.untransposed)
  print("LoRA dW = s A B: dense SVD vs factor SVD:", flush=True)
  result["factor"] = bench_factor(d, f, ranks, args.reps)
  info["loadavg_end"] = list(os.getloadavg())

  lines = []
  if "layer_set" in result:
    rows = result["layer_set"]
    nan = float("nan")
    lines += ["", "wall seconds (process CPU seconds):", "",
              "| matrices | jnp | jnp untransposed | numpy | numpy / jnp (wall) | max rel diff |",
              "|---|---|---|---|---|---|"]
    for r in rows:
      shape = f"{r['count']} x {r['shape'][0]}x{r['shape'][1]} ({r['group']})"
      naive = (f"{r['jnp_untransposed_s']:.1f} ({r['jnp_untransposed_cpu_s']:.1f})"
               if "jnp_untransposed_s" in r else "–")
      lines.append(f"| {shape} | {r['jnp_s']:.1f} ({r['jnp_cpu_s']:.1f}) | {naive} | "
                   f"{r.get('numpy_s', nan):.1f} ({r.get('numpy_cpu_s', nan):.1f}) | "
                   f"{r.get('numpy_over_jnp', nan):.2f} | {r.get('max_rel_diff', nan):.1e} |")
    tj = sum(r["jnp_s"] for r in rows)
    tn = sum(r.get("numpy_s", nan) for r in rows)
    cj = sum(r["jnp_cpu_s"] for r in rows)
    cn = sum(r.get("numpy_cpu_s", nan) for r in rows)
    result["layer_set_total"] = {"jnp_s": tj, "numpy_s": tn, "numpy_over_jnp": tn / tj,
                                 "jnp_cpu_s": cj, "numpy_cpu_s": cn}
    lines.append(f"| **one layer (7 matrices)** | **{tj:.1f} ({cj:.1f})** | | "
                 f"**{tn:.1f} ({cn:.1f})** | **{tn / tj:.2f}** | |")
  lines += ["", "| LoRA rank | shape | dense SVD (s) | factor SVD (s) | dense / factor | max rel diff |",
            "|---|---|---|---|---|---|"]
  for r in result["factor"]:
    lines.append(f"| {r['rank']} | {r['shape'][0]}x{r['shape'][1]} | {r['dense_s']:.1f} "
                 f"({r['dense_cpu_s']:.1f}) | {r['factor_s']:.4f} ({r['factor_cpu_s']:.4f}) | "
                 f"{r['speedup']:.0f}x | {r['max_rel_diff']:.1e} |")
  print("\n".join(lines))
  tmp = args.out + ".tmp"
  with open(tmp, "w") as fh:
    json.dump(result, fh, indent=1)
  os.replace(tmp, args.out)
  print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
