#!/usr/bin/env bash
# Accelerator check: bf16 MFU of a full-finetuning and a LoRA train step on a ~1B Llama
# (d_model 2048, 16 layers, 16 heads, ffn 5504, vocab 32000, seq 2048) on one GPU or TPU.
#
#   bash benchmarks/gpu_mfu.sh                 # batch 8, 10 timed steps; a few minutes
#   BATCH=4 STEPS=5 OUT=/tmp/mfu.json bash benchmarks/gpu_mfu.sh
#
# Uses the real jitted step (`lora_jax.training.Trainer`): bf16 compute, f32 params and AdamW state,
# global-norm clipping, LoRA r=16 on all 7 projections. MFU = model FLOPs per second (6N per token
# for full FT, 4N + 2N_trainable for LoRA, plus attention; lora_jax.metrics) / the device's bf16
# peak (lora_jax.metrics.PEAK_FLOPS, or PEAK_FLOPS=... to override). Target: >= 50% for full FT.
# CI never runs this; it needs jax with a GPU/TPU backend (installed here if missing and a
# package index or wheelhouse is reachable).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export BATCH=${BATCH:-8} STEPS=${STEPS:-10} OUT=${OUT:-benchmarks/results/gpu_mfu.json}
export PEAK_FLOPS=${PEAK_FLOPS:-0}

if ! "$PY" -c "import lora_jax" 2>/dev/null; then
  "$PY" -m pip install -q -e . || { echo "gpu_mfu: cannot install lora-jax" >&2; exit 1; }
fi
if [ -z "${MFU_SMOKE:-}" ] && ! "$PY" -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu')" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q "jax[cuda12]" || true
  fi
fi
[ -n "${MFU_SMOKE:-}" ] || "$PY" -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu')" || {
  echo "gpu_mfu: no GPU/TPU backend for jax ($("$PY" -c 'import jax; print(jax.devices())'))" >&2
  exit 2
}
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total --format=csv

"$PY" - <<'EOF'
import json, os, statistics, time
import jax
import numpy as np
from lora_jax.metrics import peak_flops_per_device, train_flops_per_token
from lora_jax.config import default_config
from lora_jax.training import Trainer

B, L, STEPS = int(os.environ["BATCH"]), 2048, int(os.environ["STEPS"])
MODEL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=L)
if os.environ.get("MFU_SMOKE"):  # a CPU check of this script's logic: a toy model
  L = 64
  MODEL = dict(MODEL, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=L)
dev = jax.devices()[0]
peak = peak_flops_per_device(dev, float(os.environ["PEAK_FLOPS"]))
print(f"device {dev.device_kind} x{jax.device_count()}, bf16 peak {peak and peak / 1e12} TFLOP/s")

def config(lora: bool, attention_impl):
  c = default_config()
  c.output_dir = "/tmp/lora_jax_gpu_mfu"
  c.model.preset = "llama2_7b"  # shapes replaced below
  c.model.overrides = dict(MODEL, attention_impl=attention_impl)
  c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
  c.lora.enabled, c.lora.rank, c.lora.dropout, c.lora.targets = lora, 16, 0.0, "all"
  c.optimizer.name, c.optimizer.grad_clip = "adamw", 1.0
  c.schedule.name, c.schedule.warmup_fraction, c.schedule.warmup_steps = "constant", 0.0, 0
  c.train.global_batch, c.train.seq_len = B * jax.device_count(), L
  return c

rng = np.random.default_rng(0)
tokens = rng.integers(3, MODEL["vocab_size"], (B * jax.device_count(), L)).astype(np.int32)
batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(L, dtype=np.int32), tokens.shape),
         "segment_ids": np.ones_like(tokens), "loss_mask": np.ones_like(tokens)}
rows = {}
for name, lora in (("full", False), ("lora", True)):
  for impl in ("cudnn", None):  # cuDNN flash attention when available, else XLA's choice
    try:
      t = Trainer(config(lora, impl), total_steps=10_000)
      t.init_state()
      t0 = time.perf_counter()
      for _ in range(3):
        jax.block_until_ready(t.step(batch))
      warm = time.perf_counter() - t0
      break
    except Exception as e:  # noqa: BLE001 - e.g. cuDNN unavailable on this device
      print(f"{name}: attention_impl={impl!r} failed ({type(e).__name__}: {str(e)[:200]})")
  times = []
  for _ in range(STEPS):
    t0 = time.perf_counter()
    jax.block_until_ready(t.step(batch))
    times.append(time.perf_counter() - t0)
  dt = statistics.median(times)
  flops = tokens.size * train_flops_per_token(t.model_config, t.n_total, t.n_trainable, L)
  rows[name] = {"attention_impl": impl, "step_s": dt, "tokens_per_s": tokens.size / dt,
                "params": t.n_total, "trainable": t.n_trainable, "flops_per_step": flops,
                "mfu": flops / dt / (peak * jax.device_count()) if peak else None,
                "warmup_s": warm, "memory": jax.local_devices()[0].memory_stats()}
  r = rows[name]
  print(f"{name:5s} {r['params'] / 1e9:.2f}B params ({r['trainable'] / 1e6:.1f}M trained), "
        f"attention={impl}: {dt * 1e3:.0f} ms/step, {r['tokens_per_s']:.0f} tok/s, "
        f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] else "MFU n/a (unknown peak)")
  del t
rows["lora_over_full_tokens_per_s"] = rows["lora"]["tokens_per_s"] / rows["full"]["tokens_per_s"]
print(f"LoRA / full tokens/s: {rows['lora_over_full_tokens_per_s']:.2f}x")
os.makedirs(os.path.dirname(os.environ["OUT"]) or ".", exist_ok=True)
with open(os.environ["OUT"], "w") as f:
  json.dump({"device": dev.device_kind, "devices": jax.device_count(), "batch_per_device": B,
             "seq": L, "model": MODEL, "peak_flops": peak, "rows": rows}, f, indent=1, default=str)
print("wrote", os.environ["OUT"])
EOF
