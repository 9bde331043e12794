"""Analytic per-device memory and step-time model, to rank candidate settings before compiling.

Train state bytes are exact: the parameter shapes sharded by the run's own rules
(`lora_jax.sharding`) over the candidate mesh. Activations and step time are estimates:

  saved activations per layer and token (bytes, compute dtype b):
    remat none    ~ 10 D b + 4 F b (+ the [H, L] attention scores in f32, except with splash)
    remat full    D b (the layer's input; the layer is recomputed in the backward pass)
    remat dots    D b + (projection outputs: q, k, v, o, gate, up, down)
  plus one layer's full working set during its backward pass, the f32 logits and their
  gradient, and two layers' all-gathered weights (FSDP prefetch).
  (After Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", table 2, with SwiGLU's wider MLP.)

  step time ~ max(FLOPs / peak FLOP/s, overlapped ICI bytes / ICI bandwidth) + exposed ICI
  time: FSDP all-gathers the weights twice per microbatch (forward, backward) and
  reduce-scatters the gradients once per microbatch, the data axis all-reduces the gradients
  once per step (both overlap the compute); the tensor axis all-reduces each layer's
  activations four times per microbatch (exposed).

The model only ranks; the compiled program's own numbers decide whether a setting fits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

REMAT = {  # search name -> (model.remat, LlamaConfig.remat_policy)
    "none": (False, "nothing_saveable"),
    "full": (True, "nothing_saveable"),
    "dots": (True, "dots_with_no_batch_dims_saveable"),
}
HEADROOM = 0.9  # rank as fitting only below this fraction of HBM (fragmentation, XLA buffers)


@dataclasses.dataclass(frozen=True)
class Candidate:
  remat: str
  microbatches: int
  mesh: tuple[int, int, int]  # data, fsdp, tensor

  def overrides(self) -> list[str]:
    remat, policy = REMAT[self.remat]
    data, fsdp, tensor = self.mesh
    out = [f"--config.model.remat={remat}"]
    if remat:
      out.append(f"--config.model.overrides.remat_policy={policy}")
    return out + [f"--config.train.microbatches={self.microbatches}",
                  f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
                  f"--config.mesh.tensor={tensor}"]

  def describe(self) -> str:
    d, f, t = self.mesh
    return f"remat={self.remat} microbatches={self.microbatches} mesh=data{d}/fsdp{f}/tensor{t}"


def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs carrying NamedShardings."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class Shapes:
  """What the model needs from a run, computed once per run (no allocation)."""
  model_config: Any
  lora_config: Any
  shapes: Any  # params incl. LoRA leaves
  axes: Any
  labels: Any
  optimizer: str
  n_total: int
  n_matmul: int  # parameters that multiply every token (all but the embedding table)
  n_trainable: int
  n_layer: int  # parameters of one decoder layer
  scores: bool  # attention materializes [H, L, L] scores (XLA's; splash on TPU does not)


def run_shapes(trainer) -> Shapes:
  from lora_jax.lora import count_params
  from lora_jax.model import param_logical_axes
  mc = trainer.model_config
  shapes = trainer.shapes
  n_embed = count_params(shapes["embed_tokens"])
  return Shapes(model_config=mc, lora_config=trainer.lora_config, shapes=shapes,
                axes=param_logical_axes(mc, trainer.lora_config), labels=trainer.labels,
                optimizer=trainer.cfg.optimizer.name,
                n_total=trainer.n_total, n_matmul=trainer.n_total - n_embed,
                n_trainable=trainer.n_trainable, n_layer=count_params(shapes["layers_0"]),
                scores=trainer.platform != "tpu")


@dataclasses.dataclass
class Estimate:
  frozen_bytes: int
  trainable_bytes: int
  optimizer_bytes: int
  grad_bytes: int
  activation_bytes: int
  flops: float  # per device per step
  compute_seconds: float
  comm_seconds: float  # overlapped with compute
  exposed_seconds: float  # not overlapped

  @property
  def total_bytes(self) -> int:
    return (self.frozen_bytes + self.trainable_bytes + self.optimizer_bytes + self.grad_bytes
            + self.activation_bytes)

  @property
  def step_seconds(self) -> float:
    return max(self.compute_seconds, self.comm_seconds) + self.exposed_seconds


def attention_flops_per_token(s: Shapes, seq_len: int, remat: str = "none") -> float:
  """Causal attention's FLOPs per token in training: the two [L, L] matmuls (half the square,
  as causal kernels skip the blocks above the diagonal), forward + backward, + remat's
  recomputed forward (every policy recomputes attention)."""
  mc = s.model_config
  forward = 2 * mc.num_hidden_layers * seq_len * mc.num_attention_heads * mc.dh
  return forward * (3 if remat == "none" else 4)


def train_flops_per_token(s: Shapes, seq_len: int, *, remat: str = "none",
                          model_only: bool = False) -> float:
  """Training FLOPs per token. `model_only`: the model FLOPs of MFU (PaLM, appendix B: 6 N + 12
  layers L H Dh for full finetuning, the attention term halved for causal attention; with LoRA
  the frozen weights get no gradient, so 4 N + 6 N_lora); otherwise also remat's recomputed
  forward."""
  lora = s.lora_config is not None
  # n_matmul counts the LoRA factors too: they are the trainable params under LoRA.
  flops = 4 * (s.n_matmul - s.n_trainable) + 6 * s.n_trainable if lora else 6 * s.n_matmul
  if model_only:
    return flops + attention_flops_per_token(s, seq_len)
  recompute = {"none": 0, "full": 2 * s.n_matmul, "dots": 0}[remat]
  return flops + recompute + attention_flops_per_token(s, seq_len, remat)


def placed_state(s: Shapes, mesh_sizes: tuple[int, int, int], devices: list) -> dict:
  """Per-device bytes of the frozen and trainable params on a (data, fsdp, tensor) mesh."""
  from lora_jax import sharding
  from lora_jax.lora import split_params
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(mesh_sizes), ("data", "fsdp", "tensor"))
  placed = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        s.shapes, sharding.tree_shardings(s.shapes, s.axes, mesh))
  trainable, frozen = split_params(placed, s.labels)
  return {"frozen": shard_bytes(frozen), "trainable": shard_bytes(trainable),
          "trainable_f32_all": sum(x.size * 4 for x in jax.tree.leaves(trainable))}


def estimate(s: Shapes, cand: Candidate, devices: list, *, global_batch: int, seq_len: int,
             peak_flops: float, ici_bytes_per_s: float, state: dict | None = None) -> Estimate:
  mc = s.model_config
  d, f, t = cand.mesh
  state = state or placed_state(s, cand.mesh, devices)
  tr_bytes = state["trainable"]
  tr_f32 = tr_bytes * 4 // max(np.dtype(mc.param_dtype).itemsize, 1)
  opt_bytes = tr_f32 * (2 if s.optimizer == "adamw" else 1)
  # f32 gradients (+ the accumulator with microbatches) and the optimizer update's new values.
  grad_bytes = tr_f32 * (3 if cand.microbatches > 1 else 2)

  b = np.dtype(mc.dtype).itemsize
  D, F, H, L, V = (mc.hidden_size, mc.intermediate_size, mc.num_attention_heads, seq_len,
                   mc.vocab_size)
  rows = global_batch // (cand.microbatches * d * f)  # sequences per device per microbatch
  T = rows * L
  scores = H * L * 8 / t if s.scores else 0  # f32 scores and probabilities, per token
  full_layer = (10 * D + 4 * F / t) * b + scores
  saved = {"none": full_layer, "full": D * b,
           "dots": D * b + (5 * D + 2 * F) * b / t}[cand.remat]
  layers = mc.num_hidden_layers
  activations = T * (layers * saved + 2 * full_layer) + T * V * 10 / t
  gathered = 2 * s.n_layer * np.dtype(mc.param_dtype).itemsize / t if f > 1 else 0

  tokens = global_batch * L / (d * f)  # per device per step (tensor shards split the work)
  flops = tokens * train_flops_per_token(s, L, remat=cand.remat) / t
  p_bytes = sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(s.shapes))
  tr_all = state["trainable_f32_all"]
  overlapped = 0.0  # weight gathers and gradient reductions run alongside the compute
  if f > 1:
    overlapped += cand.microbatches * (2 * p_bytes / t + tr_all / t) * (f - 1) / f
  if d > 1:
    overlapped += 2 * tr_all / (f * t) * (d - 1) / d
  # The tensor axis's activation all-reduces sit between the matmuls that need them.
  exposed = cand.microbatches * layers * 4 * 2 * T * D * b * (t - 1) / t
  ici = ici_bytes_per_s or float("inf")
  return Estimate(frozen_bytes=state["frozen"], trainable_bytes=tr_bytes,
                  optimizer_bytes=opt_bytes, grad_bytes=grad_bytes,
                  activation_bytes=int(activations + gathered), flops=flops,
                  compute_seconds=flops / peak_flops, comm_seconds=overlapped / ici,
                  exposed_seconds=exposed / ici)


def mesh_splits(n: int, heads: int, kv_heads: int) -> list[tuple[int, int, int]]:
  """(data, fsdp, tensor) over n devices; tensor divides the (kv) heads, at most 8."""
  out = []
  for t in (1, 2, 4, 8):
    if n % t or heads % t or kv_heads % t:
      continue
    rest = n // t
    for f in range(1, rest + 1):
      if rest % f == 0:
        out.append((rest // f, f, t))
  return out


def candidates(n: int, mc, global_batch: int) -> list[Candidate]:
  out = []
  for mesh in mesh_splits(n, mc.num_attention_heads, mc.num_key_value_heads):
    dp = mesh[0] * mesh[1]
    if global_batch % dp:
      continue
    per_dp = global_batch // dp
    for m in range(1, per_dp + 1):
      if per_dp % m == 0:
        out.extend(Candidate(r, m, mesh) for r in REMAT)
  return out


def rank(s: Shapes, devices: list, hbm_bytes: int, *, global_batch: int, seq_len: int,
         peak_flops: float, ici_bytes_per_s: float) -> list[tuple[Candidate, Estimate]]:
  """Every candidate with its estimate: those that fit (below HEADROOM of HBM) fastest first
  (ties: fewer microbatches, less recomputation), then the rest by memory."""
  cands = candidates(len(devices), s.model_config, global_batch)
  states = {m: placed_state(s, m, devices) for m in {c.mesh for c in cands}}
  rows = [(c, estimate(s, c, devices, global_batch=global_batch, seq_len=seq_len,
                       peak_flops=peak_flops, ici_bytes_per_s=ici_bytes_per_s,
                       state=states[c.mesh]))
          for c in cands]
  limit = HEADROOM * hbm_bytes
  order = list(REMAT).index

  def key(row):
    c, e = row
    fits = e.total_bytes <= limit
    return (not fits, e.step_seconds if fits else e.total_bytes, c.microbatches,
            order(c.remat), c.mesh[2], c.mesh[0])
  return sorted(rows, key=key)


def fits(e: Estimate, hbm_bytes: int) -> bool:
  return e.total_bytes <= HEADROOM * hbm_bytes

