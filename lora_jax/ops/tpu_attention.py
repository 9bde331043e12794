"""Splash attention (the Pallas TPU flash-attention kernel) for causal self-attention of packed
sequences: the TPU attention of training and scoring.

XLA's attention materializes the [B, H, L, L] scores; splash streams key blocks through VMEM with
an online softmax, so its memory is O(L) per head and it skips the blocks above the diagonal.

- Mask: causal, and-ed with `SegmentIds` so packed documents never see each other. A padding
  token (segment 0) attends to the padding before it; its output is unused, as on every path.
- GQA: the kernel maps query head h to key/value head h // (H / K) in its block index maps, so
  K and V are read in place, never repeated to H heads.
- Blocks: 512 queries x 512 keys in the forward and both backward kernels (the largest of 512,
  256, 128 that divides L): MaxText's defaults for long-sequence training on v5e / v5p, which
  at L = 4096 gives 8 x 8 blocks per head, 36 of them on or below the diagonal.
- Under a mesh the kernel runs per shard (`shard_map`: batch over the mesh's batch axes, heads
  over "tensor" when it divides both H and K); XLA cannot partition a custom call by itself and
  would gather its operands to every device.

`supported(L)` says whether the kernel applies (L a multiple of 128); `lora_jax.ops.attention`
falls back to XLA's attention otherwise.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

Array = jax.Array

_BLOCKS = (512, 256, 128)  # preferred first; the kernel's lanes need multiples of 128


def supported(L: int) -> bool:
  return L % _BLOCKS[-1] == 0


def _block_sizes(L: int) -> splash.BlockSizes:
  b = next(b for b in _BLOCKS if L % b == 0)
  return splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, L: int, interpret: bool):
  """The splash kernel for [heads, L, Dh] queries (built once per shape: its block tables are
  computed with numpy from the mask)."""
  mask = splash.MultiHeadMask([splash.CausalMask((L, L))] * heads)
  return splash.make_splash_mha(mask, block_sizes=_block_sizes(L), head_shards=1,
                                q_seq_shards=1, interpret=interpret)


def _per_shard(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, interpret):
  B, L, H, Dh = q_BLHD.shape
  kernel = _kernel(H, L, interpret)
  # The kernel does not scale the logits; HEAD_DIM_MINOR layout wants [heads, L, Dh].
  q_BHLD = (q_BLHD * np.asarray(1.0 / np.sqrt(Dh), q_BLHD.dtype)).transpose(0, 2, 1, 3)
  k_BKLD, v_BKLD = k_BLKD.transpose(0, 2, 1, 3), v_BLKD.transpose(0, 2, 1, 3)
  seg = splash.SegmentIds(q=segment_ids_BL, kv=segment_ids_BL)
  out_BHLD = jax.vmap(kernel)(q_BHLD, k_BKLD, v_BKLD, segment_ids=seg)
  return out_BHLD.transpose(0, 2, 1, 3)


def splash_attention(q_BLHD: Array, k_BLKD: Array, v_BLKD: Array, segment_ids_BL: Array, *,
                     mesh: Any = None, interpret: bool = False) -> Array:
  """Causal softmax attention [B, L, H, Dh] within segments; see the module docstring.

  `mesh`: the mesh the program is compiled for (None: unpartitioned). `interpret` runs the
  kernel in Pallas' interpreter (any backend; for tests on CPU).
  """
  run = functools.partial(_per_shard, interpret=interpret)
  if mesh is None or mesh.size == 1:
    return run(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
  from lora_jax import sharding
  B, L, H, _ = q_BLHD.shape
  K = k_BLKD.shape[2]
  batch = sharding.logical_to_spec(("batch",), (B,), mesh)[0]
  heads = sharding.logical_to_spec(("heads",), (H,), mesh)[0]
  if heads is None or sharding.logical_to_spec(("kv_heads",), (K,), mesh)[0] != heads:
    heads = None  # query and key/value heads must split alike for the GQA head map
  qkv = P(batch, None, heads, None)
  return jax.shard_map(run, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch, None)),
                       out_specs=qkv, check_vma=False)(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
