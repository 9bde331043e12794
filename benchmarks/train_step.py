"""Benchmark: training-step throughput, full finetuning vs LoRA, lora-jax vs HF transformers + PEFT.

    python benchmarks/train_step.py                       # bench-34M, 10 timed steps each
    python benchmarks/train_step.py --steps 3 --preset tiny --seq 64   # smoke run

Contenders (same model, shapes, data and optimizer: AdamW, global-norm clipping at 1.0, no
dropout), each framework in its own worker subprocess, timed in turns (see _harness.py):
  jax_full    lora-jax full finetuning: `Trainer.step` (the jitted step `lora-jax train` runs)
  jax_lora    lora-jax LoRA (rank --rank on all 7 projections; only A and B train)
  jax_floor   lora-jax with no weight gradient at all (only one norm scale of layer 0 trains):
              forward + activation backward, the floor any LoRA step sits above
  torch_full  transformers LlamaForCausalLM (sdpa attention), torch.optim.AdamW
  peft_lora   the same model wrapped by PEFT LoRA (same rank, alpha, targets)
  *_matmul    an n x n x n f32 matmul in each framework: the machine's measured matmul peak
torch contenders run at each of --torch-threads (suffix _1t, _2t, ...); ratios use the fastest.
The torch worker is skipped when torch / transformers / peft are not installed (`interop` extra).

Reported per contender: median wall seconds per step over --steps steps (after --warmup steps
that include compilation), tokens/s, process CPU seconds per step (all threads; steadier than
wall time on a shared machine), and MFU = model FLOPs per second / measured matmul peak, with
model FLOPs per token = 6N for full finetuning and 4N + 2N_trainable for LoRA (plus attention;
`lora_jax.metrics.train_flops_per_token`). Prints a Markdown table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _harness as H  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FLOOR_TRAINABLE = "layers_0/input_layernorm/scale"


def _tokens(spec: dict):
  import numpy as np
  rng = np.random.default_rng(spec["seed"])
  return rng.integers(3, spec["vocab"], (spec["batch"], spec["seq"])).astype(np.int32)


# --------------------------------------------------------------------------- jax worker
def _jax_config(spec: dict, mode: str):
  from lora_jax.config import default_config
  c = default_config()
  c.output_dir = "/tmp/lora_jax_bench_unused"
  c.model.preset = spec["preset"]
  c.model.dtype = spec["dtype"]
  c.lora.enabled = mode == "lora"
  c.lora.rank = spec["rank"]
  c.lora.dropout = 0.0
  c.lora.targets = "all"
  c.full_ft_frozen = f"^(?!{FLOOR_TRAINABLE}$)" if mode == "floor" else ""
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-4
  c.optimizer.grad_clip = 1.0
  c.schedule.name = "constant"
  c.schedule.warmup_fraction = 0.0
  c.schedule.warmup_steps = 0
  c.train.global_batch = spec["batch"]
  c.train.seq_len = spec["seq"]
  return c


def jax_worker(spec: dict) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lora_jax.metrics import train_flops_per_token
  from lora_jax.training import Trainer

  tokens = _tokens(spec)
  B, L = tokens.shape
  batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)),
           "segment_ids": np.ones((B, L), np.int32), "loss_mask": np.ones((B, L), np.int32)}
  contenders, info = {}, {"backend": jax.default_backend(), "jax": jax.__version__,
                          "devices": [str(d) for d in jax.devices()], "models": {}}
  for mode in spec["jax_modes"]:
    t = Trainer(_jax_config(spec, mode), total_steps=1_000_000)
    t.init_state()
    info["models"][f"jax_{mode}"] = {
        "total_params": t.n_total, "trainable_params": t.n_trainable,
        "flops_per_step": B * L * train_flops_per_token(t.model_config, t.n_total, t.n_trainable, L)}

    def step(t=t):
      jax.block_until_ready(t.step(batch))
    contenders[f"jax_{mode}"] = step
  n = spec["matmul_n"]
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  mm = jax.jit(lambda x: x @ x).lower(a).compile()
  contenders["jax_matmul"] = lambda: jax.block_until_ready(mm(a))
  info["models"]["jax_matmul"] = {"flops_per_step": 2 * n ** 3}
  H.serve(contenders, info, warmup=spec["warmup"])


# --------------------------------------------------------------------------- torch worker
def torch_worker(spec: dict) -> None:
  import peft
  import torch
  import transformers

  from lora_jax.config import preset
  from lora_jax.metrics import train_flops_per_token

  torch.manual_seed(0)
  spec["torch_threads"] = H.torch_thread_counts(spec["torch_threads"])
  cfg = preset(spec["preset"])
  hf = {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type",
                                                           "torch_dtype")}
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
  ids = torch.from_numpy(_tokens(spec)).long()
  B, L = ids.shape
  contenders, info = {}, {"torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__, "threads": torch.get_num_threads(),
                          "models": {}}

  def make(name, lora: bool):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).to(dtype)
    model.config._attn_implementation = "sdpa"  # noqa: SLF001 - HF's default, made explicit
    if lora:
      model = peft.get_peft_model(model, peft.LoraConfig(
          r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0,
          target_modules=list(TARGETS)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)
    info["models"][name] = {
        "total_params": n_total, "trainable_params": n_train,
        "flops_per_step": B * L * train_flops_per_token(cfg, n_total, n_train, L)}

    def step():
      loss = model(input_ids=ids, labels=ids).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)
    for n in spec["torch_threads"]:
      info["models"][f"{name}_{n}t"] = info["models"][name]

      def run(n=n):
        torch.set_num_threads(n)
        step()
      contenders[f"{name}_{n}t"] = run

  make("torch_full", lora=False)
  make("peft_lora", lora=True)
  n = spec["matmul_n"]
  a = torch.randn(n, n)
  for t in spec["torch_threads"]:
    def mm(t=t):
      torch.set_num_threads(t)
      return a @ a
    contenders[f"torch_matmul_{t}t"] = mm
    info["models"][f"torch_matmul_{t}t"] = {"flops_per_step": 2 * n ** 3}
  H.serve(contenders, info, warmup=spec["warmup"])


# --------------------------------------------------------------------------- parent
def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="bench_34m")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--steps", type=int, default=10, help="timed steps per contender")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (with compilation)")
  p.add_argument("--matmul-n", type=int, default=2048)
  H.add_torch_arguments(p)
  p.add_argument("--no-floor", action="store_true")
  p.add_argument("--out", default="benchmarks/results/train_step.json")
  H.add_worker_arguments(p)
  args = p.parse_args(argv)
  if H.run_worker(args, {"jax": jax_worker, "torch": torch_worker}):
    return 0

  from lora_jax.config import preset
  spec = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "rank": args.rank,
          "dtype": args.dtype, "warmup": args.warmup, "matmul_n": args.matmul_n, "seed": 0,
          "vocab": preset(args.preset).vocab_size,
          "torch_threads": H.requested_threads(args.torch_threads),
          "jax_modes": ["full", "lora"] + ([] if args.no_floor else ["floor"])}
  machine = H.machine_info()
  print(f"{H.load_line(machine)}\nspec: {spec}", flush=True)
  script = os.path.abspath(__file__)
  workers = [H.start_worker(script, "jax", ["--spec", json.dumps(spec)])]
  if not args.no_torch and H.have_modules(*H.TORCH_STACK):
    workers.append(H.start_worker(script, "torch", ["--spec", json.dumps(spec)]))
  elif not args.no_torch:
    print("torch / transformers / peft not installed (pip install -e '.[interop]'): jax only")
  workers = [w for w in workers if w is not None]
  try:
    pairs = [(w, n) for w in workers for n in w.contenders]
    samples = H.interleave(pairs, args.steps)
  finally:
    for w in workers:
      w.close()

  models = {k: v for w in workers for k, v in w.info["models"].items()}
  rows = {name: {**H.summarize(s), **models[name]} for name, s in samples.items()}
  peak_wall = max(r["flops_per_step"] / r["wall_s"] for n, r in rows.items() if "matmul" in n)
  peak_cpu = max(r["flops_per_step"] / r["cpu_s"] for n, r in rows.items() if "matmul" in n)
  tokens = args.batch * args.seq
  for name, r in rows.items():
    r["flops_per_s"] = r["flops_per_step"] / r["wall_s"]
    if "matmul" not in name:
      r["tokens_per_s"] = tokens / r["wall_s"]
      r["tokens_per_cpu_s"] = tokens / r["cpu_s"]
      r["mfu"] = r["flops_per_s"] / peak_wall
      r["mfu_cpu"] = r["flops_per_step"] / r["cpu_s"] / peak_cpu

  def best(prefix):  # the fastest thread setting of a torch contender
    cands = [n for n in rows if n.startswith(prefix + "_") and n[len(prefix) + 1:-1].isdigit()]
    return min(cands, key=lambda n: rows[n]["wall_s"]) if cands else prefix

  def ratio(a, b):
    if a in rows and b in rows:
      return {"wall": rows[b]["wall_s"] / rows[a]["wall_s"],
              "cpu": rows[b]["cpu_s"] / rows[a]["cpu_s"], "vs": b}
    return None

  tf, pl = best("torch_full"), best("peft_lora")
  ratios = {"jax_full / torch_full": ratio("jax_full", tf),
            "jax_lora / jax_full": ratio("jax_lora", "jax_full"),
            "jax_lora / peft_lora": ratio("jax_lora", pl),
            "peft_lora / torch_full": ratio(pl, tf),
            "jax_floor / jax_full (LoRA's ceiling)": ratio("jax_floor", "jax_full")}
  ratios = {k: v for k, v in ratios.items() if v is not None}
  targets = {"jax_full / torch_full": 1.0, "jax_lora / jax_full": 1.35,
             "jax_lora / peft_lora": 1.3}
  result = {"machine": machine, "spec": spec, "peak_flops_wall": peak_wall,
            "peak_flops_cpu": peak_cpu, "rows": rows, "ratios": ratios, "targets": targets,
            "workers": {w.name: {k: v for k, v in w.info.items() if k != "models"}
                        for w in workers}}
  lines = ["", f"## Train step, {args.preset} (batch {args.batch} x seq {args.seq}, "
           f"{args.dtype}, LoRA r={args.rank} on all projections)", "",
           f"median of {args.steps} steps after {args.warmup} warm-up steps; "
           f"matmul peak {peak_wall / 1e9:.0f} GFLOP/s wall ({peak_cpu / 1e9:.0f} per CPU-s)", "",
           "| contender | params trained | s/step (wall) | CPU-s/step | tokens/s | MFU |",
           "|---|---|---|---|---|---|"]
  for name, r in rows.items():
    if "matmul" in name:
      lines.append(f"| {name} ({args.matmul_n}^3 f32) | | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | "
                   f"{r['flops_per_s'] / 1e9:.0f} GFLOP/s | |")
    else:
      lines.append(f"| {name} | {r['trainable_params'] / 1e6:.2f}M / {r['total_params'] / 1e6:.1f}M"
                   f" | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['tokens_per_s']:.0f} | "
                   f"{100 * r['mfu']:.0f}% |")
  lines += ["", "| ratio (tokens/s) | wall | CPU time | target |", "|---|---|---|---|"]
  for k, v in ratios.items():
    t = targets.get(k)
    vs = f" (vs {v['vs']})" if v["vs"] not in k else ""
    lines.append(f"| {k}{vs} | {v['wall']:.2f}x | {v['cpu']:.2f}x | "
                 f"{f'>= {t}x' if t else ''} |")
  H.finish(result, lines, args.out)
  print(H.load_line(machine))
  return 0


if __name__ == "__main__":
  sys.exit(main())
