"""Schedules at key steps and decoupled LionW / AdamW against hand computations."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax import optim
from lora_jax.config import ConfigError, default_config


def _sched(**kw):
  s = default_config().schedule
  for k, v in kw.items():
    s[k] = v
  return s


def test_cosine_with_warmup_values():
  s = _sched(name="cosine_with_warmup", warmup_fraction=0.1, alpha_f=0.01)
  T = 100  # warmup 10
  got = optim.schedule_values(s, T, [0, 5, 10, 55, 100, 150])
  want = [0.0, 0.5, 1.0, 0.01 + 0.99 * 0.5, 0.01, 0.01]
  np.testing.assert_allclose(got, want, atol=1e-6)
  # warmup given in steps when the fraction is 0
  s2 = _sched(name="cosine_with_warmup", warmup_fraction=0.0, warmup_steps=4, alpha_f=0.0)
  np.testing.assert_allclose(optim.schedule_values(s2, 8, [2, 4, 6, 8]), [0.5, 1.0, 0.5, 0.0],
                             atol=1e-6)


def test_inv_sqrt_with_warmup_and_cooldown_values():
  # LLM-Foundry: t/W in warmup; 1/sqrt((t - W + S)/S) after (a_d = 0); linear to 0 over the
  # last 20% starting from the value reached at the cooldown start.
  s = _sched(name="inv_sqrt_with_warmup", warmup_fraction=0.0, warmup_steps=10,
             cooldown_fraction=0.2, inv_sqrt_scale_steps=0)
  T = 100
  start = 1 / math.sqrt((80 - 10 + 10) / 10)
  got = optim.schedule_values(s, T, [0, 5, 10, 40, 80, 90, 100])
  want = [0.0, 0.5, 1.0, 1 / math.sqrt(4.0), start, start * 0.5, 0.0]
  np.testing.assert_allclose(got, want, atol=1e-6)
  s.alpha_f_decay, s.alpha_f_cooldown = 0.1, 0.05
  a40 = 0.1 + 0.9 / math.sqrt(4.0)
  np.testing.assert_allclose(optim.schedule_values(s, T, [40, 100]), [a40, 0.05], atol=1e-6)


@pytest.mark.parametrize("args, at, want", [
    # LLM-Foundry tests/test_scheduler.py, InverseSquareRootWithWarmupScheduler on a 100-batch
    # run (the two cases quoted in paper_protocol.md):
    # (t_warmup, t_scale, t_cooldown, alpha_f_decay, alpha_f_cooldown)
    ((10, 10, 0, 0.0, 0.0), [0, 5, 10, 40, 90, 100], [0, 0.5, 1, 0.5, 1 / 3, 0.31623]),
    ((20, 2, 10, 0.4, 0.1), [0, 10, 20, 36, 90, 95, 100], [0, 0.5, 1, 0.6, 0.5, 0.3, 0.1]),
])
def test_inv_sqrt_matches_llm_foundry_published_cases(args, at, want):
  f = optim.inv_sqrt_factor(100, *args)
  np.testing.assert_allclose([float(f(t)) for t in at], want, atol=1e-5)


def test_paper_cpt_schedule_is_a_trapezoid():
  # Paper: t_warmup = t_scale = 1000, alpha_f_decay = 1, t_cooldown = 5086, alpha_f_cooldown = 0
  # over the 20B-token run (25,432 steps of 192 x 4096): warmup, flat at 1, linear to 0.
  s = _sched(name="inv_sqrt_with_warmup", warmup_fraction=0.0, warmup_steps=1000,
             inv_sqrt_scale_steps=1000, cooldown_fraction=0.2, alpha_f_decay=1.0,
             alpha_f_cooldown=0.0)
  T = 25432
  got = optim.schedule_values(s, T, [500, 1000, 10000, T - 5086, T - 2543, T])
  np.testing.assert_allclose(got, [0.5, 1.0, 1.0, 1.0, 0.5, 0.0], atol=1e-4)
  # a run shorter than its warmup stays in the warmup (LLM-Foundry: t < t_warmup wins)
  np.testing.assert_allclose(optim.schedule_values(s, 318, [0, 317]), [0.0, 0.317], atol=1e-6)


def test_inv_sqrt_rejects_decay_below_cooldown_factor():
  with pytest.raises(ValueError, match="alpha_f_decay >= alpha_f_cooldown"):
    optim.inv_sqrt_factor(100, 10, 10, 10, alpha_f_decay=0.0, alpha_f_cooldown=0.1)


def test_constant_with_and_without_warmup():
  np.testing.assert_allclose(
      optim.schedule_values(_sched(name="constant", warmup_fraction=0.0, warmup_steps=0), 10,
                            [0, 9]), [1.0, 1.0])
  np.testing.assert_allclose(
      optim.schedule_values(_sched(name="constant", warmup_fraction=0.5), 10, [0, 1, 5, 9]),
      [0.0, 0.2, 1.0, 1.0], atol=1e-6)


def test_unknown_schedule_and_optimizer_name_the_key():
  with pytest.raises(ConfigError) as e:
    optim.make_factor_schedule(_sched(name="step"), 10)
  assert e.value.key == "schedule.name"
  o = default_config().optimizer
  o.name = "sgd"
  with pytest.raises(ConfigError) as e:
    optim.make_optimizer(o, _sched(), 10)
  assert e.value.key == "optimizer.name"
  o.name = "lionw"
  with pytest.raises(ConfigError) as e:
    optim.make_optimizer(o, _sched(), 0)
  assert e.value.key == "train.steps"


def _run(tx, params, grads_seq):
  state = tx.init(params)
  for g in grads_seq:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_decoupled_lionw_matches_hand_computation():
  peak, wd, b1, b2 = 0.1, 0.2, 0.9, 0.95
  factors = [0.5, 1.0, 0.25]
  factor = lambda t: jnp.asarray(factors)[t]  # noqa: E731
  lr = lambda t: peak * factor(t)  # noqa: E731
  tx = optim.decoupled_lionw(lr, factor, b1=b1, b2=b2, weight_decay=wd)
  p0 = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
  grads = [np.array([0.3, -0.1, 0.0, 2.0], np.float32),
           np.array([-1.0, 0.2, 0.4, -0.01], np.float32),
           np.array([0.5, 0.5, -0.5, -3.0], np.float32)]
  got = _run(tx, jnp.asarray(p0), [jnp.asarray(g) for g in grads])
  # Composer DecoupledLionW.lionw, step by step.
  p, m = p0.astype(np.float64), np.zeros(4)
  for t, g in enumerate(grads):
    lr_t = peak * factors[t]
    p = p * (1 - (lr_t / peak) * wd)
    p = p - lr_t * np.sign(m + (1 - b1) * (g - m))
    m = m + (1 - b2) * (g - m)
  np.testing.assert_allclose(np.asarray(got), p, rtol=1e-6, atol=1e-7)


def test_decoupled_adamw_decay_is_not_multiplied_by_lr():
  # Zero gradients: Adam's direction is 0, so only the decay acts: p *= (1 - wd * f_t).
  factor = lambda t: jnp.float32(0.5)  # noqa: E731
  tx = optim.decoupled_adamw(lambda t: 1e-3 * factor(t), factor, weight_decay=0.1)
  got = _run(tx, jnp.ones(3), [jnp.zeros(3)] * 2)
  np.testing.assert_allclose(np.asarray(got), (1 - 0.1 * 0.5) ** 2, rtol=1e-6)


def test_make_optimizer_clips_global_norm_first():
  o = default_config().optimizer
  o.name, o.lr, o.grad_clip, o.weight_decay = "adamw", 1.0, 1.0, 0.0
  o.b1, o.b2 = 0.0, 0.0  # Adam direction = g / (|g| + eps): sign-like, so test via a 1e-9 clip
  s = _sched(name="constant", warmup_fraction=0.0, warmup_steps=0)
  tx, lr_fn = optim.make_optimizer(o, s, 10)
  assert float(lr_fn(3)) == pytest.approx(1.0)
  state = tx.init(jnp.zeros(2))
  clipped, _ = tx.update(jnp.array([3e-9, 4e-9]), state, jnp.zeros(2))
  # clipping to norm 1 leaves a norm-5e-9 gradient untouched -> same as without clipping
  o.grad_clip = 0.0
  tx2, _ = optim.make_optimizer(o, s, 10)
  unclipped, _ = tx2.update(jnp.array([3e-9, 4e-9]), tx2.init(jnp.zeros(2)), jnp.zeros(2))
  np.testing.assert_allclose(clipped, unclipped, rtol=1e-6)
  # a huge gradient is scaled to norm 1 before Adam: with eps = 1 the step shrinks accordingly
  o.grad_clip, o.eps = 1.0, 1.0
  tx3, _ = optim.make_optimizer(o, s, 10)
  big, _ = tx3.update(jnp.array([300.0, 400.0]), tx3.init(jnp.zeros(2)), jnp.zeros(2))
  np.testing.assert_allclose(np.asarray(big), -np.array([0.6, 0.8]) / (np.array([0.6, 0.8]) + 1),
                             rtol=1e-5)


def test_warmup_steps_resolution():
  assert optim.num_warmup_steps(_sched(warmup_fraction=0.1), 95) == 10
  assert optim.num_warmup_steps(_sched(warmup_fraction=0.0, warmup_steps=7), 95) == 7
