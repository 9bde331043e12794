"""LoRA projections that share an input, with a hand-written VJP (the XLA:CPU fast path).

`grouped_lora_dense(x_TD, kernels, lora_as, lora_bs, scale)` returns x W_i + scale (x A_i) B_i
for a group of projections reading the same x (q/k/v, gate/up, or one projection alone);
`lora_as[i]` is None for a projection without an adapter. Params stay separate leaves; only
compute changes:

  forward   W'_i = W_i + A_i (scale B_i) merged per step (f32 compute; with lower-precision
            compute, where merging would round a small update away, x A_i (scale B_i) is added
            after), y_i = x W'_i, and u = x [A_1 .. A_n]: one skinny pass over x per group;
  backward  per projection one matmul g_i [W'_i ; scale B_i]^T gives dx_i and g_i B_i^T together;
            dA = ((g B^T)^T x)^T in one pass over x per group; dB_i = scale (u_i^T g_i); kernel
            gradients x^T g_i only for kernels being differentiated (`symbolic_zeros`), so a LoRA
            step computes none.

Why: on CPU a step's time beyond its matmuls goes to passes over [tokens, width] activations.
Autodiff of the per-projection branch (x A, (x A) B, add; g B^T, (g B^T) A^T, add, x^T (g B^T),
(x A)^T g) makes about eight such passes per projection; here a projection adds two (g B^T is
folded into dx's matmul). XLA also emits dA as [in, T] x [T, r], a product XLA:CPU runs far
slower than the [r, T] x [T, in] one used here. On accelerators the passes overlap with the
matmuls and the per-projection autodiff is kept (see `lora_jax.ops.project`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def _ranges(sizes: Sequence[int]) -> list[tuple[int, int]]:
  out, o = [], 0
  for s in sizes:
    out.append((o, o + s))
    o += s
  return out


def _nt(a, b):
  """a b^T without materializing b^T."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())))


def _forward(x, kernels, lora_as, lora_bs, scale, merge):
  adapted = [i for i, a in enumerate(lora_as) if a is not None]
  bs = {i: lora_bs[i] * jnp.asarray(scale, lora_bs[i].dtype) for i in adapted}
  ws = tuple(kernels[i] + lora_as[i] @ bs[i] if (merge and i in bs) else kernels[i]
             for i in range(len(kernels)))
  ys = [x @ w for w in ws]
  u = None
  if adapted:
    a_cat = jnp.concatenate([lora_as[i] for i in adapted], axis=1)
    u = x @ a_cat  # [T, sum r]
    if not merge:
      for i, (lo, hi) in zip(adapted, _ranges([lora_as[i].shape[1] for i in adapted])):
        ys[i] = ys[i] + u[:, lo:hi] @ bs[i]
  return tuple(ys), (ws, u, bs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _grouped_lora_dense(x, kernels, lora_as, lora_bs, scale, merge):
  return _forward(x, kernels, lora_as, lora_bs, scale, merge)[0]


def _fwd(x, kernels, lora_as, lora_bs, scale, merge):
  value = lambda p: None if p is None else p.value  # noqa: E731
  ys, (ws, u, bs) = _forward(x.value, tuple(map(value, kernels)), tuple(map(value, lora_as)),
                             tuple(map(value, lora_bs)), scale, merge)
  flags = (x.perturbed, tuple(k.perturbed for k in kernels),
           tuple(a is not None and a.perturbed for a in lora_as),
           tuple(b is not None and b.perturbed for b in lora_bs))
  return ys, (x.value, ws, u, bs, tuple(map(value, lora_as)), flags)


def _bwd(scale, merge, res, gs):
  x, ws, u, bs, lora_as, (x_pert, k_pert, a_pert, b_pert) = res
  n, d_in = len(gs), x.shape[1]
  adapted = [i for i in range(n) if lora_as[i] is not None]
  rank_range = dict(zip(adapted, _ranges([lora_as[i].shape[1] for i in adapted])))
  dx, gus = None, {}
  for i in range(n):
    dx_i = None
    if i in bs and x_pert:  # dx and g B^T from one matmul
      # The barrier keeps XLA from splitting the product back into two by its output slices
      # (the g B^T part then became a separate, slow [r, T] product).
      dxgu = jax.lax.optimization_barrier(
          _nt(gs[i], jnp.concatenate([ws[i], bs[i]], axis=0)))  # [T, in + r]
      dx_i, gus[i] = dxgu[:, :d_in], dxgu[:, d_in:]
      if not merge:
        dx_i = dx_i + _nt(gus[i], lora_as[i])
    elif i in bs:
      gus[i] = _nt(gs[i], bs[i])
    elif x_pert:
      dx_i = _nt(gs[i], ws[i])
    if dx_i is not None:
      dx = dx_i if dx is None else dx + dx_i
  d_kernels = tuple(x.T @ gs[i] if k_pert[i] else None for i in range(n))
  d_as, d_bs = [None] * n, [None] * n
  if adapted:
    gu = jnp.concatenate([gus[i] for i in adapted], axis=1)  # [T, sum r]
    # [sum r, in]; the barrier keeps XLA from folding the transpose below into the slow
    # [in, T] x [T, r] product.
    da_t = jax.lax.optimization_barrier(gu.T @ x)
    for i in adapted:
      lo, hi = rank_range[i]
      if a_pert[i]:
        d_as[i] = da_t[lo:hi].T
      if b_pert[i]:
        d_bs[i] = (u[:, lo:hi].T @ gs[i]) * jnp.asarray(scale, gs[i].dtype)
  return dx, d_kernels, tuple(d_as), tuple(d_bs)


_grouped_lora_dense.defvjp(_fwd, _bwd, symbolic_zeros=True)


def grouped_lora_dense(x_TD: Array, kernels: Sequence[Array], lora_as: Sequence[Array | None],
                       lora_bs: Sequence[Array | None], scale: float, merge: bool | None = None
                       ) -> tuple[Array, ...]:
  """Outputs [T, out_i] of x W_i (+ scale (x A_i) B_i); see the module docstring.

  merge=None merges the adapters into the kernels for f32 compute only.
  """
  if merge is None:
    merge = jnp.dtype(x_TD.dtype) == jnp.float32
  return _grouped_lora_dense(x_TD, tuple(kernels), tuple(lora_as), tuple(lora_bs),
                             float(scale), bool(merge))
