"""Performance invariants that hold on any backend, checked on compiled programs (no timing).

* A LoRA train step computes no gradient of a frozen weight: its HLO has no dot contracting over
  the tokens into a frozen kernel's shape (the full-finetuning step has them), it does
  <= 0.75x the full step's FLOPs, and it carries no gradient or optimizer buffer for frozen
  weights (compiled output bytes and optimizer-state leaves).
* Projections run as 2-D matmuls (no 3-D dot: those cost XLA:CPU transposed copies).
* KV-cache decoding compiles nothing after warm-up (XLA backend-compile events are counted).
"""

import functools
import re

import jax
import numpy as np
import optax
import pytest
from jax._src import dispatch
from jax import monitoring

from lora_jax.config import preset
from lora_jax.generate import Generator
from lora_jax.lora import (LoraConfig, add_lora, split_params, tree_bytes, trainable_labels)
from lora_jax.model import Llama, init_params
from lora_jax.training.step import TrainState, make_train_step

CFG = preset("tiny")  # D 64, F 176, H 4 x Dh 16, K 2, V 320
B, L = 2, 24  # B * L = 48 tokens: no activation shape collides with a kernel shape
LORA = LoraConfig(rank=4, targets="all")


def _batch():
  tokens = np.random.default_rng(0).integers(3, CFG.vocab_size, (B, L)).astype(np.int32)
  return {"tokens": tokens, "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)),
          "segment_ids": np.ones((B, L), np.int32), "loss_mask": np.ones((B, L), np.int32)}


@functools.lru_cache(maxsize=None)
def _compiled(lora: bool):
  """(compiled step, state, frozen) for full finetuning or LoRA on the tiny model."""
  lora_cfg = LORA if lora else None
  params = jax.jit(functools.partial(init_params, CFG))(jax.random.key(0))
  if lora:
    params = add_lora(params, LORA, jax.random.key(1))
  trainable, frozen = split_params(params, trainable_labels(params, lora_cfg))
  tx = optax.adamw(1e-3)
  state = TrainState.create(trainable, tx, jax.random.PRNGKey(0))
  step = make_train_step(Llama(CFG, lora_cfg), tx, lambda s: 1e-3, donate=False)
  return step.lower(state, frozen, _batch()).compile(), state, frozen


def _kernel_shapes(params) -> set[tuple[int, ...]]:
  shapes = set()
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    if x.ndim == 2 and str(path[-1].key) in ("kernel", "embedding"):
      shapes |= {tuple(x.shape), tuple(x.shape[::-1])}
  return shapes


def _token_contracting_dots(hlo: str) -> list[tuple[int, ...]]:
  """Result shapes of the dots in an HLO module that contract over the B * L tokens: weight
  gradients x^T g are such dots (a merge A B, contracting over the rank, is not)."""
  shapes = {m.group(1): tuple(int(d) for d in m.group(2).split(",") if d) for m in
            re.finditer(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo)}
  out = []
  for m in re.finditer(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\),"
                       r"[^\n]*?lhs_contracting_dims=\{([\d,]*)\}", hlo):
    lhs = shapes[m.group(2)]
    size = int(np.prod([lhs[int(d)] for d in m.group(3).split(",") if d]))
    if size == B * L:
      out.append(tuple(int(d) for d in m.group(1).split(",") if d))
  return out


def _flops(compiled) -> float:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca["flops"])


def test_lora_step_has_no_frozen_weight_gradient():
  full, full_state, _ = _compiled(False)
  lora, lora_state, frozen = _compiled(True)
  kernels = _kernel_shapes(frozen)
  full_dots = [s for s in _token_contracting_dots(full.as_text()) if s in kernels]
  lora_dots = [s for s in _token_contracting_dots(lora.as_text()) if s in kernels]
  assert full_dots, "the full step should compute weight gradients (sanity of the check)"
  assert not lora_dots, f"LoRA step computes frozen-kernel-shaped dots: {lora_dots}"
  ratio = _flops(lora) / _flops(full)
  assert ratio <= 0.75, f"LoRA step FLOPs {ratio:.2f}x of full finetuning"


def test_lora_state_has_no_frozen_buffers():
  full, full_state, full_frozen = _compiled(False)
  lora, lora_state, frozen = _compiled(True)
  assert not jax.tree_util.tree_leaves(full_frozen)
  # Optimizer state: only moments of the LoRA leaves (plus scalar counters).
  leaves = jax.tree_util.tree_leaves_with_path(lora_state.opt_state)
  big = [jax.tree_util.keystr(p) for p, x in leaves if x.ndim > 0]
  assert big and all(("lora_a" in p or "lora_b" in p) for p in big), big
  assert tree_bytes(lora_state) < 0.2 * tree_bytes(full_state)
  # What the compiled step writes back (new state + metrics) is the trainable state only.
  out_lora = lora.memory_analysis().output_size_in_bytes
  out_full = full.memory_analysis().output_size_in_bytes
  assert out_lora <= tree_bytes(lora_state) + 1024
  assert out_lora < 0.2 * out_full


def _eqns(jaxpr):
  """Every equation of a jaxpr, inner jaxprs (custom_vjp, pjit, ...) included."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def test_projections_are_2d_matmuls():
  """A dot on [B, L, D] activations makes XLA:CPU copy-transpose the gradient (slow)."""
  params = jax.jit(functools.partial(init_params, CFG))(jax.random.key(0))
  params = add_lora(params, LORA, jax.random.key(1))
  tokens = _batch()["tokens"]
  for lora in (None, LORA):
    model = Llama(CFG, lora)
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens))(params).jaxpr
    ranks = [(e.invars[0].aval.ndim, e.invars[1].aval.ndim) for e in _eqns(jaxpr)
             if e.primitive.name == "dot_general"]
    # Projections, LoRA branches and lm_head are [T, in] x [in, out]; attention is 4-D batched.
    assert ranks.count((2, 2)) >= CFG.num_hidden_layers * 7 + 1, ranks
    assert all(r in ((2, 2), (4, 4)) for r in ranks), ranks


@pytest.fixture
def compile_events():
  events = []

  def listener(event, duration, **kwargs):
    if event == dispatch.BACKEND_COMPILE_EVENT:
      events.append(duration)

  monitoring.register_event_duration_secs_listener(listener)
  yield events
  monitoring.unregister_event_duration_listener(listener)


def test_decode_does_not_recompile_after_warmup(compile_events):
  params = jax.jit(functools.partial(init_params, CFG))(jax.random.key(0))
  gen = Generator(CFG, params, batch_size=2, eos_ids=[-1])  # no EOS: every row runs 24 steps
  warm = gen.generate_tokens([[1, 5, 6], [1, 7]], max_new_tokens=24)
  assert compile_events, "warm-up should compile (sanity of the counter)"
  n_compiles, traces = len(compile_events), dict(gen.trace_counts)
  out = gen.generate_tokens([[1, 9, 10, 11], [1, 12, 13]], max_new_tokens=24)
  out += gen.generate_tokens([[1, 20, 21, 22, 23, 24, 25], [1, 30]], max_new_tokens=24)
  assert all(len(t) == 24 for t in warm + out)
  assert dict(gen.trace_counts) == traces
  assert len(compile_events) == n_compiles, "generation recompiled after warm-up"
