"""Train state, masked next-token loss, and the jitted train step (with gradient accumulation).

Only the trainable subtree is differentiated: the step takes `frozen` as a separate,
non-differentiated argument and `combine_params(trainable, frozen)` inside the loss, so frozen
weights get neither gradient buffers nor optimizer state.

Loss rule: position t predicts tokens[:, t+1] and counts iff loss_mask[:, t+1] == 1 and
segment_ids[:, t+1] == segment_ids[:, t] != 0. The loss is a sum over counted tokens divided once
by their count over the whole global batch (all microbatches and devices), never a mean of means.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lora_jax.lora import combine_params
from lora_jax.sharding import BATCH_AXES

BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: step count, trainable params, optimizer state, base RNG key."""
  step: jax.Array  # int32 []
  trainable: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 [2] key; step keys are fold_in(rng, step)

  @classmethod
  def create(cls, trainable: Any, tx: optax.GradientTransformation, rng: jax.Array
             ) -> "TrainState":
    """The state before step 1: step 0, fresh optimizer state (traceable)."""
    return cls(step=jnp.zeros([], jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
               rng=rng)


def state_shardings(trainable_shardings: Any, tx: optax.GradientTransformation,
                    trainable_shapes: Any, mesh) -> TrainState:
  """Shardings of a TrainState: optimizer moments follow their params, scalars are replicated."""
  rep = NamedSharding(mesh, P())
  opt_shapes = jax.eval_shape(tx.init, trainable_shapes)
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, opt_shapes, trainable_shardings,
      transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  return TrainState(step=rep, trainable=trainable_shardings, opt_state=opt_sh, rng=rep)


def next_token_loss(logits_BLV: jax.Array, batch: Mapping[str, jax.Array]
                    ) -> tuple[jax.Array, jax.Array]:
  """(sum of f32 cross-entropies over counted positions, number of counted positions).

  Targets are the tokens shifted left by one (rolled; the last position, which has no target,
  never counts), so the [B, L, V] logits are used whole: slicing off their last position would
  copy them.
  """
  tokens, seg, mask = batch["tokens"], batch["segment_ids"], batch["loss_mask"]
  nxt = lambda x: jnp.roll(x, -1, axis=1)  # noqa: E731  nxt(x)[:, t] = x[:, t + 1]
  has_next = jnp.arange(tokens.shape[1]) < tokens.shape[1] - 1
  counted = (nxt(mask) == 1) & (nxt(seg) == seg) & (seg != 0) & has_next
  nll = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32),
                                                        nxt(tokens))
  weights = counted.astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)


def make_loss_fn(model, dropout: bool) -> Callable:
  """loss_fn(trainable, frozen, batch, key) -> (loss_sum, count)."""

  def loss_fn(trainable, frozen, batch, key):
    params = combine_params(trainable, frozen)
    rngs = {"dropout": key} if dropout else None
    logits = model.apply({"params": params}, batch["tokens"], batch["positions"],
                         batch["segment_ids"], not dropout, rngs=rngs)
    return next_token_loss(logits, batch)

  return loss_fn


def _split_microbatches(x_BL: jax.Array, m: int, mesh) -> jax.Array:
  """[B, ...] -> [M, B/M, ...] with microbatch i = rows i, i+M, ...: every device keeps its rows."""
  b = x_BL.shape[0]
  x = x_BL.reshape((b // m, m) + x_BL.shape[1:]).swapaxes(0, 1)
  if mesh is not None:
    spec = P(None, BATCH_AXES, *([None] * (x_BL.ndim - 1)))
    x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return x


def make_train_step(model, tx: optax.GradientTransformation, lr_fn: Callable, *,
                    microbatches: int = 1, dropout: bool = False, mesh=None,
                    state_sharding: TrainState | None = None, frozen_sharding: Any = None,
                    donate: bool = True) -> Callable:
  """A jitted `step(state, frozen, batch) -> (state, metrics)`.

  metrics: loss (mean over counted tokens of the global batch), grad_norm (before clipping), lr,
  loss_tokens, ok (False when loss or grad norm is NaN/Inf: the update is then skipped and
  params / optimizer state are returned unchanged; the step count still advances).
  With `mesh`, in/out shardings are NamedShardings (the modern pjit); the state is donated.
  """
  loss_fn = make_loss_fn(model, dropout)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  grad_sharding = state_sharding.trainable if state_sharding is not None else None

  def constrain(tree):
    if grad_sharding is None:
      return tree
    return jax.lax.with_sharding_constraint(tree, grad_sharding)

  def step(state: TrainState, frozen, batch):
    key = jax.random.fold_in(state.rng, state.step)
    batch = {k: batch[k] for k in BATCH_KEYS}
    if microbatches == 1:
      (loss_sum, count), grads = grad_fn(state.trainable, frozen, batch, key)
      grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    else:
      mbs = {k: _split_microbatches(v, microbatches, mesh) for k, v in batch.items()}

      def body(carry, xs):
        g_acc, l_acc, c_acc = carry
        mb, i = xs
        (l, c), g = grad_fn(state.trainable, frozen, mb, jax.random.fold_in(key, i))
        g_acc = constrain(jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g))
        return (g_acc, l_acc + l, c_acc + c), None

      zeros = constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.trainable))
      init = (zeros, jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32))
      (grads, loss_sum, count), _ = jax.lax.scan(
          body, init, (mbs, jnp.arange(microbatches, dtype=jnp.int32)))
    denom = jnp.maximum(count, 1.0)
    grads = constrain(jax.tree.map(lambda g: g / denom, grads))
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.trainable)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    # A cond rather than where(ok, new, old) per leaf: reading the old state after the update
    # makes XLA copy every donated optimizer-state buffer.
    def apply(operands):
      grads, opt_state, params = operands
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    def skip(operands):
      _, opt_state, params = operands
      return params, opt_state

    trainable, opt_state = jax.lax.cond(ok, apply, skip,
                                        (grads, state.opt_state, state.trainable))
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(lr_fn(state.step)),
               "loss_tokens": count, "ok": ok}
    return new_state, metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=(0,) if donate else ())
  rep = NamedSharding(mesh, P())
  batch_sh = {k: NamedSharding(mesh, P(BATCH_AXES, None)) for k in BATCH_KEYS}
  metrics_sh = {k: rep for k in ("loss", "grad_norm", "lr", "loss_tokens", "ok")}
  return jax.jit(step, in_shardings=(state_sharding, frozen_sharding, batch_sh),
                 out_shardings=(state_sharding, metrics_sh),
                 donate_argnums=(0,) if donate else ())

