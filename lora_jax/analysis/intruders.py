"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv 2410.21228, Algorithm 1).

A singular vector of W_ft among its top-k is an intruder when its largest absolute cosine
similarity with *all* singular vectors of W_base is below a threshold eps:

    intruder_j  <=>  max_i |<u_base_i, u_ft_j>| < eps,   j = 1..k

Defaults are that paper's main setting: k = 10, eps = 0.5. As in the paper (torch W [out, in],
left singular vectors) the vectors compared live in the layer's *output* space; with lora-jax's
Linen kernels [in, out] those are the right singular vectors (rows of vh). Singular vectors are
defined up to sign, hence the absolute value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_K = 10
DEFAULT_EPS = 0.5


def _output_vectors(w_MxN):
  """(s [K], output-space singular vectors as rows [K, N]) of a Linen kernel [in, out]; wide
  kernels go through their (tall) transpose, which is faster on CPU and gives the same space."""
  w_MxN = w_MxN.astype(jnp.float32)
  if w_MxN.shape[0] < w_MxN.shape[1]:
    u_NxK, s_K, _ = jnp.linalg.svd(w_MxN.T, full_matrices=False)
    return s_K, u_NxK.T
  _, s_K, vh_KxN = jnp.linalg.svd(w_MxN, full_matrices=False)
  return s_K, vh_KxN


def _max_cos_k(base_MxN, ft_MxN, k: int):
  _, vh_base_KxN = _output_vectors(base_MxN)
  s_ft_K, vh_ft_KxN = _output_vectors(ft_MxN)
  cos_KxC = jnp.abs(vh_base_KxN @ vh_ft_KxN[:k].T)  # rows are unit vectors: dot = cosine
  return jnp.max(cos_KxC, axis=0), s_ft_K[:k]


_max_cos_LxK = jax.jit(jax.vmap(_max_cos_k, in_axes=(0, 0, None)), static_argnums=2)


def max_cosine_stacked(base_LxMxN, ft_LxMxN, k: int = DEFAULT_K):
  """For each layer, the max |cos| of each of W_ft's top-k output-space singular vectors against
  all of W_base's: (max_cos [L, k], s_ft_top [L, k])."""
  k = min(int(k), min(np.shape(base_LxMxN)[-2:]))
  m, s = _max_cos_LxK(jnp.asarray(base_LxMxN), jnp.asarray(ft_LxMxN), k)
  return np.asarray(m), np.asarray(s)


def count_intruders(max_cos, eps: float = DEFAULT_EPS) -> np.ndarray | int:
  """Number of top-k vectors whose max |cos| with the base's singular vectors is below eps."""
  n = np.sum(np.asarray(max_cos) < eps, axis=-1)
  return int(n) if np.ndim(n) == 0 else n.astype(np.int64)


def intruder_dimensions(w_base_MxN, w_ft_MxN, k: int = DEFAULT_K, eps: float = DEFAULT_EPS) -> dict:
  """Intruder analysis of one matrix pair: {"count", "k", "eps", "max_cos" [k], "indices"}."""
  max_cos, _ = max_cosine_stacked(np.asarray(w_base_MxN)[None], np.asarray(w_ft_MxN)[None], k)
  max_cos = max_cos[0]
  return {"count": count_intruders(max_cos, eps), "k": int(max_cos.shape[0]), "eps": float(eps),
          "max_cos": max_cos, "indices": np.nonzero(max_cos < eps)[0].tolist()}
