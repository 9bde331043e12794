"""A Flax Linen Llama: RMSNorm, RoPE (default / linear / llama3), GQA attention, SwiGLU MLP.

Parameter tree (HF names, Linen [in, out] kernels; every leaf has logical axis names):

  embed_tokens/embedding                      [V, D]   (vocab, embed)
  layers_{i}/input_layernorm/scale            [D]      (embed,)
  layers_{i}/self_attn/{q,k,v,o}_proj/kernel  [D, H*Dh] / [D, K*Dh] / [H*Dh, D]
  layers_{i}/post_attention_layernorm/scale   [D]
  layers_{i}/mlp/{gate,up,down}_proj/kernel   [D, F] / [D, F] / [F, D]
  norm/scale                                  [D]
  lm_head/kernel                              [D, V]   (absent with tied embeddings)

LoRA leaves (`lora_a` [in, R], `lora_b` [R, out]) sit beside the kernels they adapt; see lora.py.

`Llama(config, lora).apply({"params": p}, tokens_BL, positions_BL, segment_ids_BL)` returns
logits [B, L, V]. With `kv_cache=` it also returns the updated cache (see `init_kv_cache`).
Segment id 0 marks padding; tokens attend only to earlier tokens of the same segment.

This module is the math; the kernels that differ by platform (CPU projection groups and
attention, accelerator attention) are in `lora_jax.ops`, picked by the `platform` attribute.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import ops
from lora_jax.config import LlamaConfig
from lora_jax.lora import LoraConfig, LoraDense

Array = jax.Array


# --------------------------------------------------------------------------- RoPE
def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies [Dh/2] with HF's scaling rules (computed in float64, returned f32)."""
  dh = config.dh
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
  scaling = config.rope_scaling or {}
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif rope_type == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    inv_freq = np.where(is_medium, smoothed, scaled)
  # HF computes inv_freq in float32 from float32 exponents; match it.
  return inv_freq.astype(np.float32)


def rope_tables(positions_BL: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
  """f32 (cos, sin) [B, L, 1, Dh] for `rotate`; sin carries rotate_half's sign (-sin, sin).

  Computed once per forward pass and materialized (optimization barrier): left to fusion, XLA
  recomputes the sin / cos of every element of every head in every consumer (each layer's q and
  k, forward and backward), transcendental work that grows with layers x heads instead of once.
  """
  angles_BLd = positions_BL[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  cos, sin = jnp.cos(angles_BLd), jnp.sin(angles_BLd)
  cos_BL1D = jnp.concatenate([cos, cos], axis=-1)[:, :, None, :]
  sin_BL1D = jnp.concatenate([-sin, sin], axis=-1)[:, :, None, :]
  return jax.lax.optimization_barrier((cos_BL1D, sin_BL1D))


def _swap_halves(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([x[..., half:], x[..., :half]], axis=-1)


def _rotate(x_BLHD, cos_BL1D, sin_BL1D):
  x = x_BLHD.astype(jnp.float32)
  return (x * cos_BL1D + _swap_halves(x) * sin_BL1D).astype(x_BLHD.dtype)


@jax.custom_vjp
def rotate(x_BLHD: Array, cos_BL1D: Array, sin_BL1D: Array) -> Array:
  """RoPE in HF's "rotate_half" convention with `rope_tables`: x cos + rotate_half(x) sin (f32)."""
  return _rotate(x_BLHD, cos_BL1D, sin_BL1D)


def _rotate_fwd(x, cos, sin):
  return _rotate(x, cos, sin), (cos, sin)


def _rotate_bwd(res, g):
  # The rotation's transpose is the rotation by -angle: one fused elementwise pass (autodiff of
  # the concatenate would add slices, pads and adds).
  cos, sin = res
  return _rotate(g, cos, -sin), None, None


rotate.defvjp(_rotate_fwd, _rotate_bwd)


# --------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BLD: Array) -> Array:
    scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                         (x_BLD.shape[-1],), self.param_dtype)
    x = x_BLD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    # HF casts back to the input dtype before multiplying by the weight.
    return (x.astype(self.dtype) * scale_D.astype(self.dtype))


def _dense(name: str, features: int, axes: tuple[str, str], cfg: LlamaConfig,
           lora: LoraConfig | None) -> LoraDense:
  return LoraDense(features=features, kernel_axes=axes, lora=lora,
                   dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                   name=name)


@dataclasses.dataclass
class KVCache:
  """Per-layer key/value buffers for incremental decoding.

  k/v: tuple over layers of [B, S, K, Dh]; segment_ids_BS: 0 for empty or padded slots;
  index: scalar int32, the next slot to write (shared by all rows; prompts are left-padded).
  """
  k: tuple
  v: tuple
  segment_ids_BS: Array
  index: Array


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "segment_ids_BS", "index"],
                                 meta_fields=[])


def init_kv_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (batch, max_len, config.num_key_value_heads, config.dh)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
  return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in zeros),
                 segment_ids_BS=jnp.zeros((batch, max_len), jnp.int32),
                 index=jnp.zeros((), jnp.int32))


def attention_mask(q_segment_BL: Array, kv_segment_BS: Array, q_slot_BL: Array,
                   kv_slot_S: Array) -> Array:
  """Boolean [B, 1, L, S]: causal by slot, same non-zero segment."""
  causal = q_slot_BL[:, :, None] >= kv_slot_S[None, None, :]
  same = (q_segment_BL[:, :, None] == kv_segment_BS[:, None, :]) & (kv_segment_BS[:, None, :] != 0)
  return (causal & same)[:, None, :, :]


class Attention(nn.Module):
  config: LlamaConfig
  lora: LoraConfig | None = None
  platform: str | None = None  # see Llama
  mesh: Any = None

  @nn.compact
  def __call__(self, x_BLD, rope_BL1D, mask_B1LS, deterministic, layer_cache=None,
               segment_ids_BL=None):
    """`segment_ids_BL`: given for self-attention without a cache (see `ops.attention`)."""
    cfg = self.config
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dh
    B, L, _ = x_BLD.shape
    platform = ops.resolve_platform(self.platform, self.mesh)
    q, k, v = ops.project(x_BLD, [_dense("q_proj", H * Dh, ("embed", "heads"), cfg, self.lora),
                                  _dense("k_proj", K * Dh, ("embed", "kv_heads"), cfg, self.lora),
                                  _dense("v_proj", K * Dh, ("embed", "kv_heads"), cfg, self.lora)],
                          deterministic, platform)
    q_BLHD = rotate(q.reshape(B, L, H, Dh), *rope_BL1D)
    k_BLKD = rotate(k.reshape(B, L, K, Dh), *rope_BL1D)
    v_BLKD = v.reshape(B, L, K, Dh)
    new_cache = None
    if layer_cache is not None:
      k_cache, v_cache, index = layer_cache
      k_BSKD = jax.lax.dynamic_update_slice(k_cache, k_BLKD.astype(k_cache.dtype), (0, index, 0, 0))
      v_BSKD = jax.lax.dynamic_update_slice(v_cache, v_BLKD.astype(v_cache.dtype), (0, index, 0, 0))
      new_cache = (k_BSKD, v_BSKD)
      k_BLKD, v_BLKD = k_BSKD.astype(q_BLHD.dtype), v_BSKD.astype(q_BLHD.dtype)
    if cfg.attention_dropout > 0 and not deterministic:
      out_BLHD = self._attention_with_dropout(q_BLHD, k_BLKD, v_BLKD, mask_B1LS)
    else:
      out_BLHD = ops.attention(q_BLHD, k_BLKD, v_BLKD, mask_B1LS, segment_ids_BL=segment_ids_BL,
                               platform=platform, impl=cfg.attention_impl, mesh=self.mesh)
    out, = ops.project(out_BLHD.reshape(B, L, H * Dh),
                       [_dense("o_proj", cfg.hidden_size, ("heads", "embed"), cfg, self.lora)],
                       deterministic, platform)
    return out, new_cache

  def _attention_with_dropout(self, q_BLHD, k_BSKD, v_BSKD, mask_B1LS):
    """Explicit softmax attention with dropout on the probabilities (GQA by head groups)."""
    B, L, H, Dh = q_BLHD.shape
    K = k_BSKD.shape[2]
    q_BLKGD = q_BLHD.reshape(B, L, K, H // K, Dh)
    logits = jnp.einsum("blkgd,bskd->bkgls", q_BLKGD, k_BSKD).astype(jnp.float32)
    logits = jnp.where(mask_B1LS[:, :, None], logits / math.sqrt(Dh), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = nn.Dropout(self.config.attention_dropout)(probs, deterministic=False)
    out = jnp.einsum("bkgls,bskd->blkgd", probs.astype(v_BSKD.dtype), v_BSKD)
    return out.reshape(B, L, H, Dh)


class MLP(nn.Module):
  config: LlamaConfig
  lora: LoraConfig | None = None
  platform: str | None = None  # see Llama

  @nn.compact
  def __call__(self, x_BLD, deterministic):
    cfg = self.config
    gate = _dense("gate_proj", cfg.intermediate_size, ("embed", "mlp"), cfg, self.lora)
    up = _dense("up_proj", cfg.intermediate_size, ("embed", "mlp"), cfg, self.lora)
    down = _dense("down_proj", cfg.hidden_size, ("mlp", "embed"), cfg, self.lora)
    platform = ops.resolve_platform(self.platform)
    g_BLF, u_BLF = ops.project(x_BLD, [gate, up], deterministic, platform)
    return ops.project(nn.silu(g_BLF) * u_BLF, [down], deterministic, platform)[0]


class DecoderLayer(nn.Module):
  config: LlamaConfig
  lora: LoraConfig | None = None
  platform: str | None = None  # see Llama
  mesh: Any = None

  @nn.compact
  def __call__(self, x_BLD, rope_BL1D, mask_B1LS, deterministic, layer_cache=None,
               segment_ids_BL=None):
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype),  # noqa: E731
                                jnp.dtype(cfg.param_dtype), name=name)
    attn_out, new_cache = Attention(cfg, self.lora, self.platform, self.mesh, name="self_attn")(
        norm("input_layernorm")(x_BLD), rope_BL1D, mask_B1LS, deterministic, layer_cache,
        segment_ids_BL)
    x_BLD = x_BLD + attn_out
    x_BLD = x_BLD + MLP(cfg, self.lora, self.platform, name="mlp")(
        norm("post_attention_layernorm")(x_BLD), deterministic)
    return x_BLD, new_cache


class Llama(nn.Module):
  """Llama decoder; `lora` adds LoRA branches to the targeted projections.

  `platform` ("cpu" | "gpu" | "tpu") picks the kernels (see `lora_jax.ops`); None or "auto"
  means the platform of `mesh`, else of jax's devices (where a program without a mesh runs).
  `mesh`: the mesh the program is compiled for; a kernel that XLA cannot partition (TPU splash
  attention) runs per shard of it.
  """
  config: LlamaConfig
  lora: LoraConfig | None = None
  platform: str | None = None
  mesh: Any = None

  @nn.compact
  def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, deterministic=True,
               kv_cache: KVCache | None = None, last_only: bool = False):
    """Logits [B, L, V], or [B, 1, V] for the last position only with `last_only` (a prefill
    that samples one token skips the other L - 1 rows of the vocab projection)."""
    cfg = self.config
    B, L = tokens_BL.shape
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones((B, L), jnp.int32)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
                     param_dtype=jnp.dtype(cfg.param_dtype),
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(0.02), ("vocab", "embed")),
                     name="embed_tokens")
    x_BLD = embed(tokens_BL)

    if kv_cache is None:
      slots_L = jnp.arange(L, dtype=jnp.int32)
      mask = attention_mask(segment_ids_BL, segment_ids_BL,
                            jnp.broadcast_to(slots_L, (B, L)), slots_L)
      cache_seg_BS = None
    else:
      index = kv_cache.index
      cache_seg_BS = jax.lax.dynamic_update_slice(kv_cache.segment_ids_BS,
                                                  segment_ids_BL.astype(jnp.int32), (0, index))
      S = cache_seg_BS.shape[1]
      q_slots_BL = jnp.broadcast_to(index + jnp.arange(L, dtype=jnp.int32), (B, L))
      mask = attention_mask(segment_ids_BL, cache_seg_BS, q_slots_BL,
                            jnp.arange(S, dtype=jnp.int32))

    platform = ops.resolve_platform(self.platform, self.mesh)
    rope_BL1D = rope_tables(positions_BL, rope_inv_freq(cfg))
    layer_cls = DecoderLayer
    if cfg.remat:
      layer_cls = nn.remat(DecoderLayer, static_argnums=(4,),
                           policy=getattr(jax.checkpoint_policies, cfg.remat_policy))
    new_k, new_v = [], []
    for i in range(cfg.num_hidden_layers):
      layer_cache = None
      if kv_cache is not None:
        layer_cache = (kv_cache.k[i], kv_cache.v[i], kv_cache.index)
      x_BLD, c = layer_cls(cfg, self.lora, platform, self.mesh, name=f"layers_{i}")(
          x_BLD, rope_BL1D, mask, deterministic, layer_cache,
          segment_ids_BL if kv_cache is None else None)
      if c is not None:
        new_k.append(c[0])
        new_v.append(c[1])

    if last_only:
      x_BLD = x_BLD[:, -1:]
    x_BLD = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype),
                    name="norm")(x_BLD)
    # 2-D matmul: see LoraDense on XLA:CPU's 3-D dot layouts.
    x_TD = x_BLD.reshape(-1, x_BLD.shape[-1])
    if cfg.tie_word_embeddings:
      logits_TV = embed.attend(x_TD)
    else:
      logits_TV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                           param_dtype=jnp.dtype(cfg.param_dtype),
                           kernel_init=nn.with_logical_partitioning(
                               nn.initializers.normal(0.02), ("embed", "vocab")),
                           name="lm_head")(x_TD)
    logits_BLV = logits_TV.reshape(B, x_BLD.shape[1], -1)
    if kv_cache is None:
      return logits_BLV
    return logits_BLV, KVCache(k=tuple(new_k), v=tuple(new_v), segment_ids_BS=cache_seg_BS,
                               index=kv_cache.index + L)


# --------------------------------------------------------------------------- helpers
def _dummy_tokens():
  return jnp.zeros((1, 1), jnp.int32)


def init_params(config: LlamaConfig, rng: Array, lora: LoraConfig | None = None) -> dict:
  """Random parameters as a plain (unboxed) pytree of arrays."""
  variables = Llama(config, lora).init(rng, _dummy_tokens())
  return nn.unbox(variables["params"])


def param_shapes(config: LlamaConfig, lora: LoraConfig | None = None) -> dict:
  """`jax.ShapeDtypeStruct` pytree of the parameters, without allocating anything."""
  return jax.eval_shape(lambda r: init_params(config, r, lora), jax.random.key(0))


def param_logical_axes(config: LlamaConfig, lora: LoraConfig | None = None) -> dict:
  """Pytree (same structure as the params) of logical axis-name tuples."""
  boxed = jax.eval_shape(lambda r: Llama(config, lora).init(r, _dummy_tokens()),
                         jax.random.key(0))["params"]
  return nn.get_partition_spec(boxed)
