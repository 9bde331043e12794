"""Softmax attention as batched GEMMs over causal query blocks (the XLA:CPU attention).

XLA:CPU runs a plain batched GEMM well and everything around it (layout copies, elementwise
passes over the [L, S] scores) slowly, so `einsum_attention` is shaped for that:

- heads go first ([B, K, G*L, Dh]) so each of the two matmuls is a plain batched GEMM with no
  layout copy of the scores (jax.nn.dot_product_attention's XLA path uses [B, L, H, S]-ordered
  einsums, which XLA:CPU copies);
- with `causal_chunks` (self-attention, where query slot i sees key slots <= i) the queries are
  split into blocks of max(64, L/8) rows and each block scores only the keys up to its end: about
  half of the square's work, and each block's scores stay cache-sized.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

_MIN_QUERY_CHUNK, _QUERY_CHUNKS = 64, 8


def _query_chunks(L: int, S: int, causal_chunks: bool) -> list[tuple[int, int, int]]:
  """(query start, query end, key end) blocks. Causal chunks skip the keys after each block."""
  if not causal_chunks or L != S or L < 2 * _MIN_QUERY_CHUNK:
    return [(0, L, S)]
  c = max(_MIN_QUERY_CHUNK, L // _QUERY_CHUNKS)
  return [(lo, min(lo + c, L), min(lo + c, L)) for lo in range(0, L, c)]


def einsum_attention(q_BLHD: Array, k_BSKD: Array, v_BSKD: Array, mask_B1LS: Array, *,
                     causal_chunks: bool = False) -> Array:
  """Softmax attention [B, L, H, Dh] (GQA: H a multiple of K); see the module docstring.

  Logits and softmax are f32, the probabilities are cast back to the value dtype.
  `causal_chunks` asserts that `mask_B1LS` is causal over equal query and key slots.
  """
  B, L, H, Dh = q_BLHD.shape
  S, K = k_BSKD.shape[1], k_BSKD.shape[2]
  G = H // K
  q_BKGLD = (q_BLHD * jnp.asarray(1.0 / math.sqrt(Dh), q_BLHD.dtype)).reshape(
      B, L, K, G, Dh).transpose(0, 2, 3, 1, 4)
  k_BKSD, v_BKSD = k_BSKD.transpose(0, 2, 1, 3), v_BSKD.transpose(0, 2, 1, 3)
  outs = []
  for lo, hi, s_hi in _query_chunks(L, S, causal_chunks):
    c = hi - lo
    q_BKQD = q_BKGLD[:, :, :, lo:hi].reshape(B, K, G * c, Dh)
    mask_B1QS = mask_B1LS[:, :, lo:hi, :s_hi]
    if G > 1:
      mask_B1QS = jnp.broadcast_to(mask_B1QS[:, :, None], (B, 1, G, c, s_hi)).reshape(
          B, 1, G * c, s_hi)
    logits = jnp.einsum("bkqd,bksd->bkqs", q_BKQD, k_BKSD[:, :, :s_hi],
                        preferred_element_type=jnp.float32)
    logits = jnp.where(mask_B1QS, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BKSD.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v_BKSD[:, :, :s_hi],
                     preferred_element_type=jnp.float32).astype(q_BLHD.dtype)
    outs.append(out.reshape(B, K, G, c, Dh))
  out_BKGLD = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out_BKGLD.transpose(0, 3, 1, 2, 4).reshape(B, L, H, Dh)
