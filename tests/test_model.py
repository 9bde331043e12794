"""Llama forward: shapes, masking, segment isolation, RoPE variants, KV cache, eval_shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import Llama, LlamaConfig, init_kv_cache, init_params, param_logical_axes, param_shapes
from lora_jax.config import preset
from lora_jax.model import rope_inv_freq

CFG = preset("tiny")


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


def _tokens(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 3, CFG.vocab_size)


def test_shapes_and_param_layout(params):
  logits = Llama(CFG).apply({"params": params}, _tokens((2, 7)))
  assert logits.shape == (2, 7, CFG.vocab_size)
  layer = params["layers_0"]
  H, K, Dh = CFG.num_attention_heads, CFG.num_key_value_heads, CFG.dh
  assert layer["self_attn"]["q_proj"]["kernel"].shape == (CFG.hidden_size, H * Dh)
  assert layer["self_attn"]["k_proj"]["kernel"].shape == (CFG.hidden_size, K * Dh)
  assert layer["mlp"]["down_proj"]["kernel"].shape == (CFG.intermediate_size, CFG.hidden_size)
  assert "lm_head" in params and len([k for k in params if k.startswith("layers_")]) == 2


def test_every_param_has_logical_axes():
  axes = param_logical_axes(CFG)
  shapes = param_shapes(CFG)
  for spec, shape in zip(jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec)), jax.tree_util.tree_leaves(shapes)):
    assert len(spec) == len(shape.shape) and all(isinstance(a, str) for a in spec)


def test_causal_mask(params):
  """Changing a later token never changes earlier logits."""
  t = _tokens((1, 8))
  t2 = t.at[0, 5].set((t[0, 5] + 1) % CFG.vocab_size)
  a = Llama(CFG).apply({"params": params}, t)
  b = Llama(CFG).apply({"params": params}, t2)
  np.testing.assert_array_equal(a[0, :5], b[0, :5])
  assert not np.allclose(a[0, 5:], b[0, 5:])


def test_segment_isolation(params):
  """Packed documents don't attend across each other; positions restart per document."""
  doc1, doc2 = _tokens((1, 5), 1), _tokens((1, 6), 2)
  other1 = _tokens((1, 5), 3)
  seg = jnp.array([[1] * 5 + [2] * 6])
  pos = jnp.array([list(range(5)) + list(range(6))])
  packed_a = Llama(CFG).apply({"params": params}, jnp.concatenate([doc1, doc2], 1), pos, seg)
  packed_b = Llama(CFG).apply({"params": params}, jnp.concatenate([other1, doc2], 1), pos, seg)
  np.testing.assert_allclose(packed_a[0, 5:], packed_b[0, 5:], atol=1e-6)
  alone = Llama(CFG).apply({"params": params}, doc2)
  np.testing.assert_allclose(packed_a[0, 5:], alone[0], atol=1e-5)


def test_padding_segment_zero_is_ignored(params):
  t = _tokens((1, 6))
  seg = jnp.array([[0, 0, 1, 1, 1, 1]])
  pos = jnp.array([[0, 0, 0, 1, 2, 3]])
  padded = Llama(CFG).apply({"params": params}, t, pos, seg)
  alone = Llama(CFG).apply({"params": params}, t[:, 2:])
  np.testing.assert_allclose(padded[0, 2:], alone[0], atol=1e-5)


def test_rope_scaling_variants():
  base = rope_inv_freq(CFG)
  linear = rope_inv_freq(CFG.replace(rope_scaling={"rope_type": "linear", "factor": 4.0}))
  np.testing.assert_allclose(linear, base / 4.0, rtol=1e-6)
  l3 = CFG.replace(rope_theta=500000.0, rope_scaling={
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64})
  f = rope_inv_freq(l3)
  raw = rope_inv_freq(CFG.replace(rope_theta=500000.0))
  wavelen = 2 * np.pi / raw
  high = wavelen < 64 / 4.0
  low = wavelen > 64 / 1.0
  np.testing.assert_allclose(f[high], raw[high], rtol=1e-6)  # high frequencies untouched
  np.testing.assert_allclose(f[low], raw[low] / 8.0, rtol=1e-6)  # low frequencies divided
  mid = ~high & ~low
  assert np.all((f[mid] <= raw[mid]) & (f[mid] >= raw[mid] / 8.0))
  with pytest.raises(ValueError, match="rope_type"):
    CFG.replace(rope_scaling={"rope_type": "yarn", "factor": 2.0})


def test_rope_is_relative(params):
  """Shifting all positions by a constant leaves logits unchanged (RoPE is relative)."""
  t = _tokens((1, 6))
  pos = jnp.arange(6)[None]
  a = Llama(CFG).apply({"params": params}, t, pos)
  b = Llama(CFG).apply({"params": params}, t, pos + 17)
  np.testing.assert_allclose(a, b, atol=2e-4)


def test_kv_cache_matches_full_forward(params):
  t = _tokens((2, 9))
  full = Llama(CFG).apply({"params": params}, t)
  cache = init_kv_cache(CFG, 2, 16)
  prefix, cache = Llama(CFG).apply({"params": params}, t[:, :6], kv_cache=cache)
  steps = [prefix]
  for i in range(6, 9):
    pos = jnp.full((2, 1), i, jnp.int32)
    logit, cache = Llama(CFG).apply({"params": params}, t[:, i:i + 1], pos, kv_cache=cache)
    steps.append(logit)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)
  assert int(cache.index) == 9


def test_last_only_logits_match_the_last_column(params):
  """`last_only` (what generation's prefill uses) = the last position of the full logits, with
  and without a KV cache, and the vocab projection runs on one row per sequence."""
  t = _tokens((2, 7))
  full = Llama(CFG).apply({"params": params}, t)
  last = Llama(CFG).apply({"params": params}, t, last_only=True)
  assert last.shape == (2, 1, CFG.vocab_size)
  np.testing.assert_allclose(last, full[:, -1:], atol=1e-5)
  cached, cache = Llama(CFG).apply({"params": params}, t, kv_cache=init_kv_cache(CFG, 2, 8),
                                   last_only=True)
  np.testing.assert_allclose(cached, full[:, -1:], atol=1e-5)
  assert int(cache.index) == 7
  flops = lambda **kw: jax.jit(lambda p: Llama(CFG).apply({"params": p}, t, **kw)).lower(  # noqa
      params).compile().cost_analysis()["flops"]
  assert flops(last_only=True) < flops() - 2 * 2 * 6 * CFG.hidden_size * CFG.vocab_size * 0.9


def test_tied_embeddings_and_bf16_compute():
  cfg = CFG.replace(tie_word_embeddings=True, dtype="bfloat16")
  p = init_params(cfg, jax.random.key(1))
  assert "lm_head" not in p
  assert p["embed_tokens"]["embedding"].dtype == jnp.float32  # params stay f32
  logits = Llama(cfg).apply({"params": p}, _tokens((1, 4)))
  assert logits.dtype == jnp.bfloat16


def test_remat_gives_same_gradients(params):
  t = _tokens((1, 6))
  loss = lambda cfg: lambda p: Llama(cfg).apply({"params": p}, t).astype(jnp.float32).mean()  # noqa: E731
  g1 = jax.grad(loss(CFG))(params)
  g2 = jax.grad(loss(CFG.replace(remat=True)))(params)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_7b_shapes_without_allocation():
  shapes = param_shapes(preset("llama2_7b"))
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  assert n == 6_738_415_616  # Llama-2-7B parameter count
  assert isinstance(jax.tree_util.tree_leaves(shapes)[0], jax.ShapeDtypeStruct)


def test_hf_config_round_trip():
  cfg = preset("llama3_8b").replace(rope_scaling={
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192})
  back = LlamaConfig.from_hf(cfg.to_hf())
  assert back == cfg
  new_style = {k: v for k, v in cfg.to_hf().items() if k not in ("rope_theta", "rope_scaling")}
  new_style["rope_parameters"] = {"rope_theta": 500000.0, **cfg.rope_scaling}
  assert LlamaConfig.from_hf(new_style) == cfg
  with pytest.raises(ValueError, match="num_key_value_heads"):
    LlamaConfig(num_attention_heads=6, num_key_value_heads=4, hidden_size=48)


def test_attention_dropout_path(params):
  t = _tokens((2, 5))
  ref = Llama(CFG).apply({"params": params}, t)
  rngs = {"dropout": jax.random.key(1)}
  near_zero = CFG.replace(attention_dropout=1e-9)  # explicit-softmax path, nothing dropped
  np.testing.assert_allclose(
      Llama(near_zero).apply({"params": params}, t, deterministic=False, rngs=rngs), ref, atol=1e-5)
  heavy = CFG.replace(attention_dropout=0.3)
  assert not np.allclose(
      Llama(heavy).apply({"params": params}, t, deterministic=False, rngs=rngs), ref, atol=1e-3)
  np.testing.assert_array_equal(Llama(heavy).apply({"params": params}, t), ref)  # eval: off
