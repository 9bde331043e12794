"""Benchmark: KV-cache generation throughput, lora-jax `Generator` vs HF transformers `generate`.

    python benchmarks/decode_vs_hf.py              # bench-34M, batch 1 and 8, 128 new tokens
    python benchmarks/decode_vs_hf.py --preset tiny --reps 2   # smoke run

Greedy decoding of --new tokens after a --prompt-token random prompt per row (no EOS: every row
runs to the end; HF gets min_new_tokens = max_new_tokens), f32 on CPU. Each framework runs in
its own worker subprocess and the contenders are timed in turns (see _harness.py); HF runs at
each of --torch-threads (suffix _1t, _2t) and ratios use the fastest; a run is one
full `generate` call (prefill + decode), tokens/s = batch * new tokens / wall seconds. lora-jax
also runs with an unmerged LoRA adapter (r=16, all projections) at the largest batch.
After the timed runs the jax worker reports how many XLA compilations happened after warm-up
(target: 0) and the Generator's trace counts. Prints a Markdown table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _harness as H  # noqa: E402


def _prompts(spec: dict, batch: int):
  import numpy as np
  rng = np.random.default_rng(spec["seed"])
  return rng.integers(3, spec["vocab"], (batch, spec["prompt"])).astype(np.int32)


def jax_worker(spec: dict) -> None:
  import jax
  from jax import monitoring
  from jax._src import dispatch

  from lora_jax.config import preset
  from lora_jax.generate import Generator
  from lora_jax.lora import LoraConfig, add_lora
  from lora_jax.model import init_params

  cfg = preset(spec["preset"])
  params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
  lora = LoraConfig(rank=spec["rank"], targets="all")
  lora_params = add_lora(params, lora, jax.random.key(1))
  compiles = []

  def on_event(event, duration, **kw):
    if event == dispatch.BACKEND_COMPILE_EVENT:
      compiles.append(duration)
  monitoring.register_event_duration_secs_listener(on_event)

  contenders, gens = {}, {}
  for b in spec["batches"]:
    gens[f"jax_b{b}"] = Generator(cfg, params, batch_size=b, eos_ids=[-1])
  b_max = max(spec["batches"])
  gens[f"jax_lora_b{b_max}"] = Generator(cfg, lora_params, lora, batch_size=b_max, eos_ids=[-1])
  for name, gen in gens.items():
    prompts = [list(map(int, p)) for p in _prompts(spec, gen.batch_size)]

    def run(gen=gen, prompts=prompts):
      out = gen.generate_tokens(prompts, max_new_tokens=spec["new"])
      assert all(len(t) == spec["new"] for t in out)
    contenders[name] = run
  state = {}

  def mark():
    state["compiles_at_ready"] = len(compiles)
    return len(compiles)

  def report():
    return {"compiles_after_warmup": len(compiles) - state["compiles_at_ready"],
            "compiles_total": len(compiles),
            "trace_counts": {n: dict(g.trace_counts) for n, g in gens.items()}}
  H.serve(contenders, {"jax": jax.__version__, "backend": jax.default_backend()},
          warmup=spec["warmup"], calls={"mark": mark, "report": report})


def torch_worker(spec: dict) -> None:
  import torch
  import transformers

  from lora_jax.config import preset

  torch.manual_seed(0)
  hf = {k: v for k, v in preset(spec["preset"]).to_hf().items()
        if k not in ("architectures", "model_type", "torch_dtype")}
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).eval()
  contenders = {}
  threads = H.torch_thread_counts(spec["torch_threads"])
  for b, t in ((b, t) for b in spec["batches"] for t in threads):
    ids = torch.from_numpy(_prompts(spec, b)).long()

    def run(ids=ids, t=t):
      torch.set_num_threads(t)
      with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=spec["new"], min_new_tokens=spec["new"],
                             do_sample=False, pad_token_id=0)
      assert out.shape[1] == ids.shape[1] + spec["new"]
    contenders[f"hf_b{b}_{t}t"] = run
  H.serve(contenders, {"torch": torch.__version__, "transformers": transformers.__version__,
                       "threads": torch.get_num_threads()}, warmup=spec["warmup"])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="bench_34m")
  p.add_argument("--batches", default="1,8")
  p.add_argument("--new", type=int, default=128, help="new tokens per row")
  p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--reps", type=int, default=5, help="timed generate calls per contender")
  p.add_argument("--warmup", type=int, default=1)
  H.add_torch_arguments(p)
  p.add_argument("--out", default="benchmarks/results/decode_vs_hf.json")
  H.add_worker_arguments(p)
  args = p.parse_args(argv)
  if H.run_worker(args, {"jax": jax_worker, "torch": torch_worker}):
    return 0

  from lora_jax.config import preset
  spec = {"preset": args.preset, "batches": [int(b) for b in args.batches.split(",")],
          "new": args.new, "prompt": args.prompt, "rank": args.rank, "warmup": args.warmup,
          "seed": 0, "vocab": preset(args.preset).vocab_size,
          "torch_threads": H.requested_threads(args.torch_threads)}
  machine = H.machine_info()
  print(f"{H.load_line(machine)}\nspec: {spec}", flush=True)
  script = os.path.abspath(__file__)
  jw = H.start_worker(script, "jax", ["--spec", json.dumps(spec)])
  workers = [jw]
  if not args.no_torch and H.have_modules("torch", "transformers"):
    workers.append(H.start_worker(script, "torch", ["--spec", json.dumps(spec)]))
  workers = [w for w in workers if w is not None]
  try:
    jw.call("mark")
    samples = H.interleave([(w, n) for w in workers for n in w.contenders], args.reps)
    compile_report = jw.call("report")
  finally:
    for w in workers:
      w.close()

  rows = {}
  for name, s in samples.items():
    b = int(name.split("_b", 1)[1].split("_")[0])
    r = {**H.summarize(s), "batch": b}
    r["tokens_per_s"] = b * args.new / r["wall_s"]
    r["tokens_per_cpu_s"] = b * args.new / r["cpu_s"]
    rows[name] = r
  ratios = {}
  for b in spec["batches"]:
    hf = [n for n in rows if n.startswith(f"hf_b{b}_")]
    if hf:
      best = min(hf, key=lambda n: rows[n]["wall_s"])
      ratios[f"jax_b{b} / {best}"] = {
          "wall": rows[best]["wall_s"] / rows[f"jax_b{b}"]["wall_s"],
          "cpu": rows[best]["cpu_s"] / rows[f"jax_b{b}"]["cpu_s"]}
  result = {"machine": machine, "spec": spec, "rows": rows, "ratios": ratios,
            "compiles": compile_report, "workers": {w.name: w.info for w in workers}}
  lines = ["", f"## KV-cache decoding, {args.preset}: {args.prompt}-token prompts, {args.new} new "
           f"tokens, greedy, f32 (median of {args.reps} calls)", "",
           "| contender | batch | s/call (wall) | CPU-s/call | tokens/s |", "|---|---|---|---|---|"]
  for name, r in rows.items():
    lines.append(f"| {name} | {r['batch']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
                 f"{r['tokens_per_s']:.0f} |")
  lines += ["", "| ratio (tokens/s) | wall | CPU time | target |", "|---|---|---|---|"]
  for k, v in ratios.items():
    lines.append(f"| {k} | {v['wall']:.2f}x | {v['cpu']:.2f}x | >= 1.0x |")
  lines.append(f"\nXLA compilations after warm-up: {compile_report['compiles_after_warmup']} "
               f"(target 0); traces: {compile_report['trace_counts']}")
  H.finish(result, lines, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
