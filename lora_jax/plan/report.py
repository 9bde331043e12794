"""The plan as JSON (`build`) and as text (`format_text`).

JSON fields: target (devices, per-device HBM and the published peaks with their source),
setting (the candidate compiled last, and the `--config.` overrides that select it), params,
per_device (bytes of the frozen base, trainable params, optimizer state and the train step's
temporaries; total vs HBM), fits, programs (each compiled program's memory and cost analysis,
per device), estimate (roofline, labelled ESTIMATE) and search (the analytic ranking).
"""

from __future__ import annotations

from typing import Any

import jax

from lora_jax.plan import memory_model as mm

GiB = 1024**3
ESTIMATE_LABEL = ("ESTIMATE: roofline (an upper bound) from the compiled program's FLOPs and "
                  "bytes accessed and the chip's published peaks; not a measurement, ignores "
                  "communication")


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _estimate(train, target, cfg, shapes, cand) -> dict | None:
  """Roofline of the train step. The cost analysis counts the microbatch loop's body once, so
  its FLOPs and bytes are scaled by the microbatch count, and it does not see into the splash
  kernels (custom calls), whose causal attention FLOPs are added analytically."""
  if not target.peak_flops or train is None:
    return None
  n = len(target.devices)
  tokens = cfg.train.global_batch * cfg.train.seq_len
  flops = train.flops * cand.microbatches
  if train.splash_kernels:
    flops += tokens * mm.attention_flops_per_token(shapes, cfg.train.seq_len, cand.remat) / n
  accessed = train.bytes_accessed * cand.microbatches
  compute = flops / target.peak_flops
  memory = accessed / target.hbm_bytes_per_s
  step = max(compute, memory)
  model_flops = tokens * mm.train_flops_per_token(shapes, cfg.train.seq_len, model_only=True)
  return {"label": ESTIMATE_LABEL, "step_seconds": step, "compute_seconds": compute,
          "memory_seconds": memory, "bound": "compute" if compute >= memory else "memory",
          "flops_per_device": flops, "bytes_accessed_per_device": accessed,
          "tokens_per_s_per_chip": tokens / target.num_chips / step,
          "model_flops_per_step": model_flops,
          "mfu": model_flops / n / (step * target.peak_flops),
          "peak_bf16_flops_per_device": target.peak_flops,
          "hbm_bytes_per_s_per_device": target.hbm_bytes_per_s, "source": target.source}


def build(*, target, note: str, ranked, attempts, shapes, auto: bool) -> dict:
  cand, run_cfg, result = attempts[-1]
  got = result.get("got")
  per_device: dict[str, Any] = {"hbm_bytes": target.hbm_bytes}
  programs = {}
  analytic = result.get("analytic")
  if analytic is not None:  # the memory model's numbers (nothing compiled)
    per_device.update(
        frozen_base_bytes=analytic.frozen_bytes, trainable_bytes=analytic.trainable_bytes,
        optimizer_bytes=analytic.optimizer_bytes,
        temp_bytes=analytic.grad_bytes + analytic.activation_bytes,
        total_bytes=analytic.total_bytes, peak_bytes=analytic.total_bytes)
  if got is not None:
    tr = got.trainer
    programs = {k: p.to_json() for k, p in got.programs.items()}
    per_device.update(
        frozen_base_bytes=mm.shard_bytes(_abstract(tr.frozen_shapes, tr.frozen_sharding)),
        trainable_bytes=mm.shard_bytes(tr.abstract_state.trainable),
        optimizer_bytes=mm.shard_bytes(tr.abstract_state.opt_state))
    train = got.programs.get("train")
    if train is not None:
      per_device.update(temp_bytes=train.temp_bytes, total_bytes=train.total_bytes)
    per_device["peak_bytes"] = max(p.total_bytes for p in got.programs.values())
  if analytic is not None:
    fits = mm.fits(analytic, target.hbm_bytes)
  else:
    fits = got is not None and per_device["peak_bytes"] <= target.hbm_bytes
  est = _estimate(got.programs.get("train") if got else None, target, run_cfg, shapes, cand)
  return {
      "target": target.to_json(),
      "note": note,
      "auto": auto,
      "basis": "analytic memory model (nothing compiled)" if analytic is not None else "compiled",
      "setting": {"remat": cand.remat, "microbatches": cand.microbatches,
                  "mesh": dict(zip(("data", "fsdp", "tensor"), cand.mesh)),
                  "overrides": cand.overrides()},
      "params": {"total": shapes.n_total,
                 "trainable": shapes.n_trainable,
                 "matmul": shapes.n_matmul},
      "train": {"global_batch": run_cfg.train.global_batch, "seq_len": run_cfg.train.seq_len,
                "lora": shapes.lora_config is not None,
                "lora_rank": shapes.lora_config.rank if shapes.lora_config else 0},
      "per_device": per_device,
      "fits": bool(fits),
      "compile_error": result.get("error", ""),
      "compiled": [c.describe() for c, _, _ in attempts],
      "programs": programs,
      "estimate": est,
      "search": [{"setting": c.describe(), "overrides": c.overrides(),
                  "fits": mm.fits(e, target.hbm_bytes), "total_bytes": e.total_bytes,
                  "activation_bytes": e.activation_bytes, "step_seconds": e.step_seconds}
                 for c, e in ranked[:8]],
  }


def _gib(x) -> str:
  return f"{x / GiB:.2f} GiB" if x >= GiB / 10 else f"{x / 1024**2:.2f} MiB"


def format_text(r: dict) -> str:
  t, pd = r["target"], r["per_device"]
  lines = [f"plan for {t['name']}: {t['devices']} devices, {_gib(t['hbm_bytes'])} HBM each "
           f"({r['basis']})"]
  if r["note"]:
    lines.append(f"note: {r['note']}")
  s = r["setting"]
  lines.append(f"setting: remat={s['remat']} microbatches={s['microbatches']} mesh="
               + "/".join(f"{k}{v}" for k, v in s["mesh"].items()))
  p = r["params"]
  lines.append(f"params: {p['total']:,} ({p['trainable']:,} trainable)")
  if "total_bytes" in pd:
    lines.append("per device (train step): frozen base {}, trainable {}, optimizer {}, "
                 "temporaries {}; total {} of {}".format(
                     _gib(pd["frozen_base_bytes"]), _gib(pd["trainable_bytes"]),
                     _gib(pd["optimizer_bytes"]), _gib(pd["temp_bytes"]),
                     _gib(pd["total_bytes"]), _gib(pd["hbm_bytes"])))
  for name, prog in r["programs"].items():
    lines.append(f"  {name:8s} total {_gib(prog['total_bytes'])} (temp {_gib(prog['temp_bytes'])})"
                 f", {prog['flops']:.3e} FLOPs, {prog['bytes_accessed']:.3e} bytes accessed"
                 f" per device; compiled in {prog['compile_seconds']:.0f} s"
                 + (", splash attention" if prog["splash_kernels"] else ""))
  if r["compile_error"]:
    lines.append(f"compiler: {r['compile_error']}")
  lines.append(f"FITS: {'yes' if r['fits'] else 'NO'}")
  e = r["estimate"]
  if e:
    lines.append(f"{e['label']}:")
    lines.append(f"  per device per step: {e['flops_per_device']:.3e} FLOPs, "
                 f"{e['bytes_accessed_per_device']:.3e} bytes accessed (the loop body's cost "
                 f"x {s['microbatches']} microbatches, + splash attention's FLOPs)")
    lines.append(f"  step {e['step_seconds']:.3f} s ({e['bound']}-bound), "
                 f"{e['tokens_per_s_per_chip']:,.0f} tokens/s per chip, MFU {e['mfu']:.1%}")
    lines.append(f"  peaks per device: {e['peak_bf16_flops_per_device']:.3e} bf16 FLOP/s, "
                 f"{e['hbm_bytes_per_s_per_device']:.3e} HBM bytes/s ({e['source']})")
  if r["auto"]:
    lines.append("analytic ranking (best first; estimates):")
    for row in r["search"]:
      lines.append(f"  {'fits' if row['fits'] else 'over'} {_gib(row['total_bytes']):>10s} "
                   f"{row['step_seconds']:.3f} s  {row['setting']}")
    lines.append("use: " + " ".join(s["overrides"]))
  return "\n".join(lines)
