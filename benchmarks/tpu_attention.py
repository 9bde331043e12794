"""Benchmark (compile-time, no TPU needed): TPU attention memory, splash kernel vs XLA's attention.

    pip install -e '.[tpu]'
    python benchmarks/tpu_attention.py                       # v5e:2x2, Llama-2-7B heads, L=4096
    python benchmarks/tpu_attention.py --topology v5p:2x2x1 --seq 2048

Compiles forward + backward of causal, packed-segment attention (what a training step runs per
layer) for a TPU topology with libtpu on this host (abstract devices, batch split over the chips,
one sequence per chip by default), once with `lora_jax.ops.tpu_attention.splash_attention` and
once with jax.nn.dot_product_attention's XLA path, and prints the compiled programs' temporaries
per chip (`memory_analysis()`); writes JSON (--out). These are the compiler's numbers for the
chip, not measurements on one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from lora_jax.fileio import atomic_write_json  # noqa: E402
from lora_jax.model import attention_mask  # noqa: E402
from lora_jax.ops import tpu_attention  # noqa: E402
from lora_jax.sharding import make_mesh  # noqa: E402


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--topology", default="v5e:2x2")
  ap.add_argument("--seq", type=int, default=4096)
  ap.add_argument("--heads", type=int, default=32)
  ap.add_argument("--kv-heads", type=int, default=32)
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--per-chip", type=int, default=1, help="sequences per chip")
  ap.add_argument("--out", default="benchmarks/results/tpu_attention.json")
  a = ap.parse_args(argv)
  devices = topologies.get_topology_desc(topology_name=a.topology, platform="tpu").devices
  mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices=devices)
  B, L = a.per_chip * len(devices), a.seq
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  arg = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=batch)  # noqa: E731
  args = (arg(B, L, a.heads, a.head_dim), arg(B, L, a.kv_heads, a.head_dim),
          arg(B, L, a.kv_heads, a.head_dim),
          jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=batch))

  def xla(q, k, v, seg):
    slots = jnp.arange(L)
    mask = attention_mask(seg, seg, jnp.broadcast_to(slots, (B, L)), slots)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

  def splash(q, k, v, seg):
    return tpu_attention.splash_attention(q, k, v, seg, mesh=mesh)

  rows = {}
  for name, fn in (("splash", splash), ("xla", xla)):
    loss = lambda q, k, v, s, fn=fn: jnp.sum(fn(q, k, v, s).astype(jnp.float32))  # noqa: E731
    t = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).compile()
    mem = compiled.memory_analysis()
    rows[name] = {"temp_bytes": int(mem.temp_size_in_bytes),
                  "argument_bytes": int(mem.argument_size_in_bytes),
                  "compile_s": round(time.perf_counter() - t, 1)}
    print(f"{name:7s} temporaries per chip {mem.temp_size_in_bytes / 2**20:9.1f} MiB "
          f"(compiled in {rows[name]['compile_s']} s)")
  atomic_write_json(a.out, {"topology": a.topology, "chips": len(devices), "batch": B, "seq": L,
                            "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
                            "dtype": "bfloat16", "jax": jax.__version__, "per_chip": rows})


if __name__ == "__main__":
  main()
