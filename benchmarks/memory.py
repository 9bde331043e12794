"""Benchmark: training memory, full finetuning vs LoRA.

    python benchmarks/memory.py                  # bench-34M measured + Llama-2-7B analytic
    python benchmarks/memory.py --no-rss         # skip the subprocess RSS measurements

Three views:
  1. train-state bytes (params + grads + optimizer state), from the real pytrees' shapes
     (`jax.eval_shape`: nothing is allocated), for bench-34M and Llama-2-7B, f32 and bf16 params;
     AdamW (two f32 moments per trainable weight), gradients as f32 of the trainable leaves;
  2. the compiled train step's `memory_analysis()` on bench-34M (arguments, outputs, temporaries:
     what XLA actually allocates), plus a check that the LoRA step has no gradient or optimizer
     buffer for a frozen weight;
  3. peak RSS of a process that builds the model and runs --steps train steps (lora-jax full /
     LoRA, and HF transformers full / PEFT LoRA when installed), minus the RSS after imports.
Prints Markdown tables and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _harness as H  # noqa: E402

GB = 2 ** 30


# --------------------------------------------------------------------------- analytic
def state_bytes(preset_name: str, rank: int, param_dtype: str = "float32") -> dict:
  """Train-state bytes of full finetuning and LoRA from shapes alone."""
  import jax

  from lora_jax.config import preset
  from lora_jax.lora import LoraConfig, count_params, split_params, tree_bytes, trainable_labels
  from lora_jax.model import param_shapes
  from lora_jax.optim import decoupled_adamw

  cfg = preset(preset_name, param_dtype=param_dtype)
  tx = decoupled_adamw(lambda t: 1e-4, lambda t: 1.0)
  out = {}
  for mode, lora in (("full", None), ("lora", LoraConfig(rank=rank, targets="all"))):
    shapes = param_shapes(cfg, lora)
    trainable, frozen = split_params(shapes, trainable_labels(shapes, lora))
    opt = jax.eval_shape(tx.init, trainable)
    grads = count_params(trainable) * 4  # the step accumulates / clips gradients in f32
    row = {"params": tree_bytes(shapes), "trainable_params": count_params(trainable),
           "total_params": count_params(shapes), "grads": grads, "optimizer": tree_bytes(opt),
           "frozen_leaves_in_optimizer": _frozen_in_opt(opt, frozen)}
    row["total"] = row["params"] + row["grads"] + row["optimizer"]
    out[mode] = row
  out["lora_over_full"] = out["lora"]["total"] / out["full"]["total"]
  return out


def _frozen_in_opt(opt_state, frozen) -> int:
  """Optimizer-state leaves whose path names a frozen parameter (must be 0)."""
  import jax
  frozen_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(frozen)}
  n = 0
  for p, _ in jax.tree_util.tree_leaves_with_path(opt_state):
    s = jax.tree_util.keystr(p)
    n += any(s.endswith(f) for f in frozen_paths)
  return n


# --------------------------------------------------------------------------- compiled
def compiled_memory(preset_name: str, rank: int, batch: int, seq: int) -> dict:
  """XLA's memory analysis of the jitted train step (AOT, from abstract shapes)."""
  import jax
  import numpy as np

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from train_step import _jax_config
  from lora_jax.training import Trainer

  spec = {"preset": preset_name, "rank": rank, "dtype": "float32", "batch": batch, "seq": seq}
  out = {}
  for mode in ("full", "lora"):
    t = Trainer(_jax_config(spec, mode), total_steps=1000)
    frozen = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          t.frozen_shapes, t.frozen_sharding)
    b = {k: jax.ShapeDtypeStruct((batch, seq), np.int32) for k in
         ("tokens", "positions", "segment_ids", "loss_mask")}
    compiled = t.step_fn.lower(t.abstract_state, frozen, b).compile()
    ma = compiled.memory_analysis()
    if ma is None:
      return {"available": False}
    out[mode] = {k: int(getattr(ma, k)) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
        "alias_size_in_bytes", "generated_code_size_in_bytes") if hasattr(ma, k)}
    out[mode]["state_bytes"] = int(sum(np.prod(x.shape) * x.dtype.itemsize
                                       for x in jax.tree.leaves(t.abstract_state)))
    out[mode]["frozen_bytes"] = int(sum(np.prod(x.shape) * x.dtype.itemsize
                                        for x in jax.tree.leaves(frozen)))
  out["available"] = True
  return out


# --------------------------------------------------------------------------- RSS
def rss_worker(kind: str, spec: dict) -> None:
  """Runs in a subprocess: RSS after imports, then peak RSS after building + stepping."""
  import numpy as np

  def rss_now():
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
    return 0

  if kind.startswith("jax"):
    import jax

    from train_step import _jax_config
    from lora_jax.training import Trainer
    base = rss_now()
    t = Trainer(_jax_config(spec, kind.split("_")[1]), total_steps=1000)
    t.init_state()
    B, L = spec["batch"], spec["seq"]
    from lora_jax.config import preset
    tokens = np.random.default_rng(0).integers(3, preset(spec["preset"]).vocab_size,
                                               (B, L)).astype(np.int32)
    batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)),
             "segment_ids": np.ones((B, L), np.int32), "loss_mask": np.ones((B, L), np.int32)}
    for _ in range(spec["steps"]):
      jax.block_until_ready(t.step(batch))
  else:
    import peft
    import torch
    import transformers

    from train_step import TARGETS
    from lora_jax.config import preset
    base = rss_now()
    hf = {k: v for k, v in preset(spec["preset"]).to_hf().items()
          if k not in ("architectures", "model_type", "torch_dtype")}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    if kind == "peft_lora":
      model = peft.get_peft_model(model, peft.LoraConfig(
          r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0,
          target_modules=list(TARGETS)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(3, preset(spec["preset"]).vocab_size, (spec["batch"], spec["seq"]))
    for _ in range(spec["steps"]):
      model(input_ids=ids, labels=ids).loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(H.MARK + json.dumps({"rss_after_imports": base, "peak_rss": peak}), flush=True)


def measure_rss(kinds: list[str], spec: dict) -> dict:
  out = {}
  for kind in kinds:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-worker", kind,
                           "--spec", json.dumps(spec)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(H.MARK)]
    if proc.returncode or not lines:
      print(f"  {kind}: failed ({proc.stderr.strip().splitlines()[-1:]})", flush=True)
      continue
    r = json.loads(lines[-1][len(H.MARK):])
    r["peak_minus_imports"] = r["peak_rss"] - r["rss_after_imports"]
    out[kind] = r
    print(f"  {kind}: peak RSS {r['peak_rss'] / 2**20:.0f} MiB "
          f"({r['peak_minus_imports'] / 2**20:.0f} MiB above imports)", flush=True)
  return out


# --------------------------------------------------------------------------- main
def _fmt(b: float) -> str:
  return f"{b / GB:.2f} GiB" if b >= GB / 4 else f"{b / 2**20:.1f} MiB"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="bench_34m")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=3, help="train steps in each RSS subprocess")
  p.add_argument("--no-rss", action="store_true")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--out", default="benchmarks/results/memory.json")
  p.add_argument("--rss-worker", help=argparse.SUPPRESS)
  p.add_argument("--spec", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.rss_worker:
    rss_worker(args.rss_worker, json.loads(args.spec))
    return 0

  machine = H.machine_info()
  print(H.load_line(machine), flush=True)
  result = {"machine": machine, "analytic": {}}
  for name, dtype in ((args.preset, "float32"), ("llama2_7b", "float32"),
                      ("llama2_7b", "bfloat16")):
    result["analytic"][f"{name}/{dtype}"] = state_bytes(name, args.rank, dtype)
  print("compiling the train steps for memory_analysis()...", flush=True)
  result["compiled"] = compiled_memory(args.preset, args.rank, args.batch, args.seq)
  if not args.no_rss:
    kinds = ["jax_full", "jax_lora"]
    if not args.no_torch and H.have_modules(*H.TORCH_STACK):
      kinds += ["torch_full", "peft_lora"]
    spec = {"preset": args.preset, "rank": args.rank, "batch": args.batch, "seq": args.seq,
            "steps": args.steps, "dtype": "float32"}
    print("peak RSS, one subprocess each:", flush=True)
    result["rss"] = measure_rss(kinds, spec)

  lines = ["", f"## Train-state bytes (params + grads + AdamW state), LoRA r={args.rank} on all "
           "projections", "",
           "| model | params dtype | full FT | LoRA | LoRA / full | trainable (LoRA) | "
           "frozen leaves with optimizer state |", "|---|---|---|---|---|---|---|"]
  for key, r in result["analytic"].items():
    name, dtype = key.split("/")
    lines.append(f"| {name} | {dtype} | {_fmt(r['full']['total'])} | {_fmt(r['lora']['total'])} "
                 f"| {r['lora_over_full']:.3f} | {r['lora']['trainable_params'] / 1e6:.1f}M of "
                 f"{r['lora']['total_params'] / 1e6:.0f}M | {r['lora']['frozen_leaves_in_optimizer']} |")
  c = result["compiled"]
  if c.get("available"):
    lines += ["", f"## Compiled train step, {args.preset} (batch {args.batch} x seq {args.seq}):"
              " XLA memory_analysis()", "",
              "| | arguments | outputs (new state) | temporaries | LoRA / full |", "|---|---|---|---|---|"]
    f, lo = c["full"], c["lora"]
    for mode, r in (("full FT", f), ("LoRA", lo)):
      lines.append(f"| {mode} | {_fmt(r['argument_size_in_bytes'])} | "
                   f"{_fmt(r['output_size_in_bytes'])} | {_fmt(r['temp_size_in_bytes'])} | |")
    tot = lambda r: r["argument_size_in_bytes"] + r["temp_size_in_bytes"]  # noqa: E731
    c["lora_over_full_args_plus_temp"] = tot(lo) / tot(f)
    c["lora_outputs_minus_state"] = lo["output_size_in_bytes"] - lo["state_bytes"]
    lines.append(f"| LoRA / full (arguments + temporaries) | | | | "
                 f"{c['lora_over_full_args_plus_temp']:.3f} |")
    lines.append(f"\nLoRA step outputs {lo['output_size_in_bytes']} bytes = its trainable state "
                 f"({lo['state_bytes']} bytes) + metrics: no frozen weight's gradient or optimizer "
                 "buffer leaves the step.")
  if result.get("rss"):
    lines += ["", f"## Peak RSS, {args.preset}, {args.steps} train steps (one process each)", "",
              "| process | peak RSS | above RSS after imports |", "|---|---|---|"]
    for k, r in result["rss"].items():
      lines.append(f"| {k} | {_fmt(r['peak_rss'])} | {_fmt(r['peak_minus_imports'])} |")
    rs = result["rss"]
    for a, b in (("jax_lora", "jax_full"), ("peft_lora", "torch_full")):
      if a in rs and b in rs:
        result.setdefault("rss_ratios", {})[f"{a} / {b}"] = (
            rs[a]["peak_minus_imports"] / rs[b]["peak_minus_imports"])
        lines.append(f"| {a} / {b} (above imports) | | "
                     f"{result['rss_ratios'][f'{a} / {b}']:.2f} |")
  H.finish(result, lines, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
