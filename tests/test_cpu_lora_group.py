"""grouped_lora_dense (the CPU LoRA group): outputs and every gradient equal autodiff of the
per-projection LoRA formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.ops.cpu_lora_group import grouped_lora_dense

T, D, R, SCALE = 12, 8, 3, 2.0
OUTS = (8, 4, 6)


def _setup(adapted):
  ks = jax.random.split(jax.random.key(0), 10)
  x = jax.random.normal(ks[0], (T, D))
  kernels = [jax.random.normal(ks[1 + i], (D, o)) for i, o in enumerate(OUTS)]
  a_s = [jax.random.normal(ks[4 + i], (D, R)) if adapted[i] else None for i in range(3)]
  b_s = [jax.random.normal(ks[7 + i], (R, o)) if adapted[i] else None for i, o in enumerate(OUTS)]
  cot = [jax.random.normal(jax.random.key(9 + i), (T, o)) for i, o in enumerate(OUTS)]
  return x, kernels, a_s, b_s, cot


def _reference(x, kernels, a_s, b_s):
  return [x @ k + (0 if a is None else SCALE * (x @ a) @ b) for k, a, b in zip(kernels, a_s, b_s)]


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("adapted", [(True, True, True), (True, False, True), (False, True, False)])
def test_matches_autodiff(merge, adapted):
  x, kernels, a_s, b_s, cot = _setup(adapted)
  got = grouped_lora_dense(x, kernels, a_s, b_s, SCALE, merge=merge)
  for g, w in zip(got, _reference(x, kernels, a_s, b_s)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

  def loss(fn, x, kernels, a_s, b_s):
    return sum(jnp.sum(y * c) for y, c in zip(fn(x, kernels, a_s, b_s), cot))

  ours = lambda *a: grouped_lora_dense(*a, SCALE, merge=merge)  # noqa: E731
  for argnums in [(0, 1, 2, 3), (2, 3), (1,)]:  # all / LoRA step (x, kernels frozen) / kernels
    want = jax.grad(lambda *a: loss(_reference, *a), argnums)(x, kernels, a_s, b_s)
    got = jax.grad(lambda *a: loss(ours, *a), argnums)(x, kernels, a_s, b_s)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def _token_contractions(fn, *args):
  """Output shapes of the dot_generals in fn's jaxpr that contract over the T tokens."""
  out = []
  for eqn in jax.make_jaxpr(fn)(*args).eqns:
    if eqn.primitive.name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      if any(eqn.invars[0].aval.shape[d] == T for d in lc):
        out.append(eqn.outvars[0].aval.shape)
  return out


def test_lora_grad_skips_kernel_gradients():
  """Differentiating only A and B: no [D, out] weight gradient (a T contraction) is computed;
  differentiating the kernels too: there is one per kernel (the check can fail)."""
  x, kernels, a_s, b_s, cot = _setup((True, True, True))

  def loss(kernels, a_s, b_s):
    ys = grouped_lora_dense(x, kernels, a_s, b_s, SCALE)
    return sum(jnp.sum(y * c) for y, c in zip(ys, cot))

  kernel_shapes = {(D, o) for o in OUTS}
  lora_only = _token_contractions(jax.grad(loss, (1, 2)), kernels, a_s, b_s)
  assert lora_only and not set(lora_only) & kernel_shapes, lora_only
  with_kernels = _token_contractions(jax.grad(loss, (0, 1, 2)), kernels, a_s, b_s)
  assert set(with_kernels) >= kernel_shapes, with_kernels
