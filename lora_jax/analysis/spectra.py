"""Singular-value spectra of weight matrices and the scalar summaries the paper reports.

All SVDs run in float32 with `jnp.linalg.svd` (singular values only, `compute_uv=False`, unless
vectors are asked for), batched over a leading layer axis with `jax.vmap` so all layers' copies
of one module (e.g. every q_proj [D, H*Dh]) go through one compiled call. `jax.jit` caches one
executable per input shape, so a model with 7 module shapes compiles at most 7 times per function.

Summaries (numpy, any leading batch axes, singular values sorted descending along the last axis):

  rank_at_variance(s, p)  smallest k with sum_{i<=k} s_i^2 >= p * sum_i s_i^2 (the paper's
                          "rank needed to explain p of the variance"; p=0.9 by default)
  effective_rank(s)       exp(H(q)), q_i = s_i / sum_j s_j (Roy & Vetterli 2007: the singular
                          values themselves, not their squares, are normalized)
  relative_norm           ||dW||_F / ||W_base||_F

A LoRA perturbation dW = scale * A B (A [M, R], B [R, N]) has rank <= R; `factor_svd` gets its exact
singular values from QR factorizations of A and B^T and an R x R SVD in O((M + N) R^2), never forming
the M x N matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Energy shortfall tolerated by `rank_at_variance`, relative to the total: absorbs float32
# round-off so that an exactly rank-k matrix has rank_at_variance(s, 1.0) == k.
RANK_RTOL = 1e-6


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


# --------------------------------------------------------------------------- dense SVDs
def svals(w_MxN):
  """Singular values of one matrix (traceable). Wide matrices are transposed first: same values,
  and XLA's CPU LAPACK call (gesdd) is several times faster on tall inputs than on wide ones."""
  if w_MxN.shape[0] < w_MxN.shape[1]:
    w_MxN = w_MxN.T
  return jnp.linalg.svd(w_MxN, compute_uv=False)


@jax.jit
def _svals_LxK(w_LxMxN):
  return jax.vmap(svals)(_f32(w_LxMxN))


def singular_values(w_MxN) -> np.ndarray:
  """Singular values [K] (K = min(M, N)), descending, of one matrix (float32 compute)."""
  return np.asarray(_svals_LxK(np.asarray(w_MxN)[None]))[0]


def singular_values_stacked(w_LxMxN) -> np.ndarray:
  """Singular values [L, K] of a stack of same-shaped matrices (one vmapped SVD)."""
  return np.asarray(_svals_LxK(w_LxMxN))


@jax.jit
def _pair_LxK(base_LxMxN, ft_LxMxN):
  base, ft = _f32(base_LxMxN), _f32(ft_LxMxN)
  delta = ft - base
  batched = jax.vmap(svals)
  fro = lambda w: jnp.sqrt(jnp.sum(jnp.square(w), axis=(-2, -1)))
  return batched(base), batched(ft), batched(delta), fro(base), fro(delta)


def pair_spectra(base_LxMxN, ft_LxMxN) -> dict[str, np.ndarray]:
  """Spectra of W_base, W_ft and dW = W_ft - W_base for a stack of layers, in one jitted call.

  Returns {"base", "ft", "delta": [L, K]; "base_fro", "delta_fro": [L]}; dW is formed on the device
  in float32 (inputs of any float dtype, e.g. bfloat16, are upcast first).
  """
  s_base, s_ft, s_delta, f_base, f_delta = _pair_LxK(base_LxMxN, ft_LxMxN)
  return {"base": np.asarray(s_base), "ft": np.asarray(s_ft), "delta": np.asarray(s_delta),
          "base_fro": np.asarray(f_base), "delta_fro": np.asarray(f_delta)}


# --------------------------------------------------------------------------- factor SVD
def _factor_core(a_MxR, b_RxN, scale):
  qa_MxR, ra_RxR = jnp.linalg.qr(_f32(a_MxR))
  qb_NxR, rb_RxR = jnp.linalg.qr(_f32(b_RxN).T)
  core_RxR = scale * ra_RxR @ rb_RxR.T  # dW = qa core qb^T
  return qa_MxR, core_RxR, qb_NxR


@jax.jit
def _factor_svals_LxR(a_LxMxR, b_LxRxN, scale):
  def one(a, b):
    _, core, _ = _factor_core(a, b, scale)
    return jnp.linalg.svd(core, compute_uv=False)
  return jax.vmap(one)(a_LxMxR, b_LxRxN)


@jax.jit
def _factor_svd_LxR(a_LxMxR, b_LxRxN, scale):
  def one(a, b):
    qa, core, qb = _factor_core(a, b, scale)
    u, s, vh = jnp.linalg.svd(core)
    return qa @ u, s, vh @ qb.T
  return jax.vmap(one)(a_LxMxR, b_LxRxN)


def factor_svd(a_MxR, b_RxN, scale: float = 1.0, compute_uv: bool = False):
  """Exact SVD of dW = scale * A @ B without forming it (A [M, R], B [R, N]).

  A = Qa Ra and B^T = Qb Rb give dW = Qa (scale Ra Rb^T) Qb^T; the R x R core's SVD U S V^T yields
  dW = (Qa U) S (Qb V)^T. Returns s [R] or (u [M, R], s [R], vh [R, N]).
  Cost O((M + N) R^2) instead of O(M N min(M, N)).
  """
  a, b = np.asarray(a_MxR)[None], np.asarray(b_RxN)[None]
  if not compute_uv:
    return np.asarray(_factor_svals_LxR(a, b, jnp.float32(scale)))[0]
  u, s, vh = _factor_svd_LxR(a, b, jnp.float32(scale))
  return np.asarray(u)[0], np.asarray(s)[0], np.asarray(vh)[0]


def factor_singular_values_stacked(a_LxMxR, b_LxRxN, scale: float = 1.0) -> np.ndarray:
  """Singular values [L, R] of scale * A_l B_l for a stack of LoRA factors."""
  return np.asarray(_factor_svals_LxR(a_LxMxR, b_LxRxN, jnp.float32(scale)))


@jax.jit
def _lora_pair_LxK(base_LxMxN, a_LxMxR, b_LxRxN, scale):
  base = _f32(base_LxMxN)
  delta = scale * jnp.einsum("lmr,lrn->lmn", _f32(a_LxMxR), _f32(b_LxRxN))
  ft = base + delta
  batched = jax.vmap(svals)
  fro = lambda w: jnp.sqrt(jnp.sum(jnp.square(w), axis=(-2, -1)))
  return batched(base), batched(ft), fro(base), fro(delta)


def lora_pair_spectra(base_LxMxN, a_LxMxR, b_LxRxN, scale: float) -> dict[str, np.ndarray]:
  """Like `pair_spectra` for W_ft = W_base + scale * A B; dW's spectrum comes from the factors.

  The "delta" rows are zero-padded from R to K = min(M, N) (the exact spectrum: rank <= R).
  """
  s_base, s_ft, f_base, f_delta = _lora_pair_LxK(base_LxMxN, a_LxMxR, b_LxRxN, jnp.float32(scale))
  s_delta = factor_singular_values_stacked(a_LxMxR, b_LxRxN, scale)
  s_base = np.asarray(s_base)
  padded = np.zeros_like(s_base)
  r = min(s_delta.shape[-1], padded.shape[-1])
  padded[:, :r] = s_delta[:, :r]
  return {"base": s_base, "ft": np.asarray(s_ft), "delta": padded,
          "base_fro": np.asarray(f_base), "delta_fro": np.asarray(f_delta)}


# --------------------------------------------------------------------------- summaries
def explained_variance(s) -> np.ndarray:
  """Cumulative fraction of sum s^2 explained by the top-k singular values, k = 1..K."""
  e = np.square(np.asarray(s, np.float64))
  total = e.sum(axis=-1, keepdims=True)
  cum = np.cumsum(e, axis=-1)
  return np.divide(cum, total, out=np.zeros_like(cum), where=total > 0)


def rank_at_variance(s, p: float = 0.9) -> np.ndarray | int:
  """Smallest k with sum_{i<=k} s_i^2 >= p * sum_i s_i^2 (0 for an all-zero spectrum).

  `s` holds singular values along its last axis (descending); leading axes are batch axes.
  """
  if not 0.0 < p <= 1.0:
    raise ValueError(f"variance fraction must be in (0, 1], got {p}")
  e = np.square(np.asarray(s, np.float64))
  total = e.sum(axis=-1)
  cum = np.cumsum(e, axis=-1)
  hit = cum >= (p - RANK_RTOL) * total[..., None]
  k = np.argmax(hit, axis=-1) + 1
  k = np.where(total > 0, k, 0)
  return int(k) if np.ndim(k) == 0 else k.astype(np.int64)


def effective_rank(s) -> np.ndarray | float:
  """Roy & Vetterli (2007) effective rank exp(-sum q_i log q_i), q_i = s_i / sum_j s_j.

  1 for a rank-1 matrix, K for K equal singular values, 0 for the zero matrix.
  """
  s = np.abs(np.asarray(s, np.float64))
  total = s.sum(axis=-1, keepdims=True)
  q = np.divide(s, total, out=np.zeros_like(s), where=total > 0)
  logq = np.log(q, out=np.zeros_like(q), where=q > 0)
  erank = np.exp(-(q * logq).sum(axis=-1))
  erank = np.where(total[..., 0] > 0, erank, 0.0)
  return float(erank) if np.ndim(erank) == 0 else erank


def relative_norm(delta_fro, base_fro) -> np.ndarray | float:
  """||dW||_F / ||W_base||_F (inf where the base is zero and dW is not)."""
  d, b = np.asarray(delta_fro, np.float64), np.asarray(base_fro, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    r = np.where(b > 0, d / np.where(b > 0, b, 1.0), np.where(d > 0, np.inf, 0.0))
  return float(r) if np.ndim(r) == 0 else r


def normalized_spectrum(s) -> np.ndarray:
  """s / s_max (zeros stay zero), for plotting spectra of different scales together."""
  s = np.asarray(s, np.float64)
  top = s.max(axis=-1, keepdims=True) if s.size else s
  return np.divide(s, top, out=np.zeros_like(s), where=top > 0)


def compiled_shapes() -> dict[str, int]:
  """Number of cached executables per jitted SVD entry point (jit's cache is keyed by shape)."""
  return {f.__name__: f._cache_size() for f in (_svals_LxK, _pair_LxK, _lora_pair_LxK,
                                                _factor_svals_LxR, _factor_svd_LxR)}
