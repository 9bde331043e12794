"""Benchmark: KV-cache decode throughput of `lora_jax.generate` (random weights, greedy).

    nice python benchmarks/decode.py                          # tiny and bench_34m, batch 1 and 8
    python benchmarks/decode.py --presets bench_34m --batch 32 --new-tokens 256

Each row: a warm-up call (compiles prefill + the while_loop decode for that shape), then the best
of `--reps` timed calls of `Generator.generate_tokens` on 16-token prompts with no EOS, so every
row decodes exactly `--new-tokens` tokens. tokens/s counts generated tokens over the whole call
(prefill of 16 tokens included); process CPU time is printed beside wall time because shared
machines make wall time noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax

from lora_jax.config import preset
from lora_jax.data.tokenizers import ByteTokenizer
from lora_jax.generate import Generator
from lora_jax.model import init_params


def bench(name: str, batch: int, new_tokens: int, reps: int) -> dict:
  cfg = preset(name)
  params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
  gen = Generator(cfg, params, None, ByteTokenizer(), batch_size=batch, eos_ids=())
  prompts = [[1] + [10 + (b + j) % 200 for j in range(15)] for b in range(batch)]
  t0 = time.perf_counter()
  gen.generate_tokens(prompts, max_new_tokens=new_tokens)
  compile_s = time.perf_counter() - t0
  best = None
  for _ in range(reps):
    w0, c0 = time.perf_counter(), time.process_time()
    out = gen.generate_tokens(prompts, max_new_tokens=new_tokens)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    if best is None or wall < best[0]:
      best = (wall, cpu)
  n = sum(len(o) for o in out)
  return {"preset": name, "batch": batch, "new_tokens": new_tokens, "tokens": n,
          "wall_s": best[0], "cpu_s": best[1], "tokens_per_s": n / best[0],
          "first_call_s": compile_s}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--presets", default="tiny,bench_34m")
  ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--out", default=None, help="write the rows as JSON here")
  args = ap.parse_args()
  rows = []
  print(f"backend {jax.default_backend()} ({platform.processor() or platform.machine()}), "
        f"{jax.device_count()} device(s)")
  for name in args.presets.split(","):
    for b in (int(x) for x in args.batch.split(",")):
      r = bench(name, b, args.new_tokens, args.reps)
      rows.append(r)
      print(f"{name:10s} batch {b:3d}: {r['tokens']:6d} tokens in {r['wall_s']:7.3f}s wall "
            f"({r['cpu_s']:6.2f}s CPU) -> {r['tokens_per_s']:9.1f} tok/s; first call "
            f"{r['first_call_s']:.1f}s", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
