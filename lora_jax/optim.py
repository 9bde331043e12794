"""Optimizers and LR schedules, matching the paper's Composer / LLM-Foundry stack.

Schedules are factors of the peak LR evaluated at the optimizer step count t (0 for the first
update, as Composer evaluates its schedulers on batches completed):

  cosine_with_warmup   t / W during warmup, then alpha_f + (1 - alpha_f) (1 + cos(pi tau)) / 2
                       with tau = (t - W) / (T - W)          (Composer CosineAnnealingWithWarmup)
  inv_sqrt_with_warmup LLM-Foundry's InverseSquareRootWithWarmupScheduler: t / W during warmup,
                       then a_d + (1 - a_d) / sqrt((t - W + S) / S) (S = t_scale) until
                       max(T - C, W), then linear from that value to alpha_f_cooldown over the
                       C = t_cooldown steps. With a_d = 1 the decay is flat: warmup, constant,
                       linear cooldown (the paper's CPT "trapezoid").
  constant             t / W during warmup, then 1

Optimizers apply weight decay the decoupled Composer way, scaled by the schedule factor and not
by the LR: p <- p - wd * (lr_t / peak_lr) * p.

  lionw  Composer DecoupledLionW: u = sign(b1 m + (1 - b1) g); m <- b2 m + (1 - b2) g;
         p <- p - lr_t u - wd (lr_t / peak) p
  adamw  Composer DecoupledAdamW: optax's Adam direction with the same decoupled decay.

Global-norm clipping (`grad_clip` > 0) comes first in the chain.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_jax.config.errors import ConfigError, require

Schedule = Callable[[jax.Array], jax.Array]


def num_warmup_steps(sched_cfg, total_steps: int) -> int:
  if sched_cfg.warmup_fraction > 0:
    return int(round(sched_cfg.warmup_fraction * total_steps))
  return int(sched_cfg.warmup_steps)


def _warmup(w: int) -> Schedule:
  return optax.linear_schedule(0.0, 1.0, w)


def cosine_factor(total_steps: int, warmup: int, alpha_f: float) -> Schedule:
  decay = optax.cosine_decay_schedule(1.0, max(total_steps - warmup, 1), alpha=alpha_f)
  if warmup <= 0:
    return decay
  return optax.join_schedules([_warmup(warmup), decay], [warmup])


def inv_sqrt_factor(t_max: int, t_warmup: int, t_scale: int, t_cooldown: int,
                    alpha_f_decay: float = 0.0, alpha_f_cooldown: float = 0.0) -> Schedule:
  """LLM-Foundry's `InverseSquareRootWithWarmupScheduler` with every time in optimizer steps.

  t_max is the run's length (the scheduler's "1dur"); the cooldown starts at
  max(t_max - t_cooldown, t_warmup), so a run shorter than its warmup never leaves the warmup.
  With t_cooldown = 0 the factor holds its value from t_max on.
  """
  if t_scale <= 0:
    raise ValueError(f"inv_sqrt_with_warmup: t_scale must be > 0, got {t_scale}")
  if alpha_f_decay < alpha_f_cooldown:
    raise ValueError("inv_sqrt_with_warmup: needs alpha_f_decay >= alpha_f_cooldown, got "
                     f"{alpha_f_decay} < {alpha_f_cooldown}")
  cool_start = max(t_max - t_cooldown, t_warmup)

  def decay(t):
    return alpha_f_decay + (1.0 - alpha_f_decay) / jnp.sqrt((t - t_warmup + t_scale) / t_scale)

  def factor(count):
    t = jnp.asarray(count, jnp.float32)
    warm = t / max(t_warmup, 1)
    a_i = decay(jnp.float32(cool_start))
    frac = jnp.minimum((t - cool_start) / max(t_cooldown, 1), 1.0)
    cool = a_i + frac * (alpha_f_cooldown - a_i) if t_cooldown > 0 else a_i
    return jnp.where(t < t_warmup, warm, jnp.where(t < cool_start, decay(t), cool))

  return factor


def constant_factor(warmup: int) -> Schedule:
  if warmup <= 0:
    return optax.constant_schedule(1.0)
  return optax.join_schedules([_warmup(warmup), optax.constant_schedule(1.0)], [warmup])


def make_factor_schedule(sched_cfg, total_steps: int) -> Schedule:
  """The LR factor (1.0 = peak) as a function of the step count."""
  w = num_warmup_steps(sched_cfg, total_steps)
  name = sched_cfg.name
  if name == "cosine_with_warmup":
    return cosine_factor(total_steps, w, sched_cfg.alpha_f)
  if name == "inv_sqrt_with_warmup":
    return inv_sqrt_factor(total_steps, w, int(sched_cfg.inv_sqrt_scale_steps) or max(w, 1),
                           int(round(sched_cfg.cooldown_fraction * total_steps)),
                           sched_cfg.alpha_f_decay, sched_cfg.alpha_f_cooldown)
  if name == "constant":
    return constant_factor(w)
  raise ConfigError("schedule.name", f"unknown schedule {name!r}")


class ScheduledDecayState(NamedTuple):
  count: jax.Array


def scheduled_weight_decay(weight_decay: float, factor: Schedule) -> optax.GradientTransformation:
  """Adds -weight_decay * factor(t) * p to the updates (Composer's decoupled decay)."""

  def init_fn(params):
    del params
    return ScheduledDecayState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scheduled_weight_decay needs params")
    f = factor(state.count).astype(jnp.float32) * weight_decay
    updates = jax.tree.map(lambda u, p: u - (f * p.astype(jnp.float32)).astype(u.dtype),
                           updates, params)
    return updates, ScheduledDecayState(count=optax.safe_increment(state.count))

  if weight_decay == 0:
    return optax.identity()
  return optax.GradientTransformation(init_fn, update_fn)


def decoupled_lionw(lr: Schedule, factor: Schedule, b1: float = 0.9, b2: float = 0.95,
                    weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Composer's DecoupledLionW: `lr` is the LR schedule, `factor` = lr / peak_lr."""
  return optax.chain(optax.scale_by_lion(b1=b1, b2=b2), optax.scale_by_learning_rate(lr),
                     scheduled_weight_decay(weight_decay, factor))


def decoupled_adamw(lr: Schedule, factor: Schedule, b1: float = 0.9, b2: float = 0.95,
                    eps: float = 1e-8, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Composer's DecoupledAdamW: Adam with decay -wd * (lr / peak_lr) * p."""
  return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), optax.scale_by_learning_rate(lr),
                     scheduled_weight_decay(weight_decay, factor))


def make_optimizer(opt_cfg, sched_cfg, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Schedule]:
  """(optimizer, lr_schedule) from the run config's `optimizer` and `schedule` sections: the one
  place the optimizer is built from a config (ConfigError names the key at fault)."""
  require(total_steps >= 1, "train.steps", f"the run has {total_steps} steps; it needs at least 1")
  factor = make_factor_schedule(sched_cfg, total_steps)
  peak = float(opt_cfg.lr)
  lr = lambda count: peak * factor(count)  # noqa: E731
  if opt_cfg.name == "lionw":
    tx = decoupled_lionw(lr, factor, opt_cfg.b1, opt_cfg.b2, opt_cfg.weight_decay)
  elif opt_cfg.name == "adamw":
    tx = decoupled_adamw(lr, factor, opt_cfg.b1, opt_cfg.b2, opt_cfg.eps, opt_cfg.weight_decay)
  else:
    raise ConfigError("optimizer.name", f"unknown optimizer {opt_cfg.name!r}")
  if opt_cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), tx)
  return tx, lr


def schedule_values(sched_cfg, total_steps: int, steps) -> list[float]:
  """Factor values at `steps` (host floats; for tests, plots and logs)."""
  f = make_factor_schedule(sched_cfg, total_steps)
  return [float(f(jnp.asarray(s))) for s in steps]


__all__ = ["make_optimizer", "make_factor_schedule", "inv_sqrt_factor", "decoupled_lionw", "decoupled_adamw",
           "scheduled_weight_decay", "num_warmup_steps", "schedule_values"]
