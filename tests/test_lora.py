"""Functional LoRA: init == base, merge/unmerge, labels, split, optimizer state, 7B count."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax import (Llama, LoraConfig, add_lora, combine_params, count_params, init_params,
                      merge_lora, param_shapes, split_params, trainable_labels, unmerge_lora)
from lora_jax.config import preset
from lora_jax.lora import lora_subtree, optax_mask, tree_bytes

CFG = preset("tiny")
TOKENS = jax.random.randint(jax.random.key(9), (2, 7), 3, CFG.vocab_size)


@pytest.fixture(scope="module")
def base():
  return init_params(CFG, jax.random.key(0))


def _randomize_b(params, seed=1):
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  def f(path, x):
    if path[-1].key == "lora_b":
      return 0.1 * jax.random.normal(next(keys), x.shape, x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(f, params)


def _logits(params, lora=None):
  return Llama(CFG, lora).apply({"params": params}, TOKENS)


def test_fresh_lora_equals_base_exactly(base):
  lora = LoraConfig(rank=4, targets="all")
  p = add_lora(base, lora, jax.random.key(1))
  np.testing.assert_array_equal(_logits(p, lora), _logits(base))
  a = p["layers_0"]["self_attn"]["q_proj"]["lora_a"]
  assert a.shape == (CFG.hidden_size, 4) and float(jnp.abs(a).max()) > 0
  assert float(jnp.abs(a).max()) <= 1 / np.sqrt(CFG.hidden_size)  # PEFT's kaiming bound


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_equals_unmerged_and_unmerge_inverts(base, rslora):
  lora = LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "mlp"], use_rslora=rslora)
  p = _randomize_b(add_lora(base, lora, jax.random.key(1)))
  unmerged = _logits(p, lora)
  assert not np.allclose(unmerged, _logits(base), atol=1e-4)  # the adapter does something
  merged = merge_lora(p, lora)
  assert "lora_a" not in merged["layers_0"]["self_attn"]["q_proj"]
  np.testing.assert_allclose(_logits(merged), unmerged, atol=1e-5)
  back = unmerge_lora(merged, lora_subtree(p), lora)
  for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(p)):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_target_shorthands():
  assert LoraConfig(targets="attention").target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
  assert LoraConfig(targets="mlp").target_modules == ("gate_proj", "up_proj", "down_proj")
  assert len(LoraConfig(targets="all").target_modules) == 7
  assert LoraConfig(rank=16).scale == 2.0  # alpha defaults to 2r as in the paper
  assert LoraConfig(rank=16, alpha=32, use_rslora=True).scale == 8.0


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, "rank"), ({"rank": -3}, "rank"), ({"targets": "qproj"}, "'qproj'"),
    ({"targets": []}, "targets"), ({"dropout": 1.5}, "dropout"), ({"init": "svd"}, "init")])
def test_validation_names_the_bad_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LoraConfig(**kwargs)


def test_add_lora_old_signature_warns_and_gives_the_same_params(base):
  lora = LoraConfig(rank=2, targets="attention")
  with pytest.warns(DeprecationWarning, match="add_lora"):
    old = add_lora(base, CFG, lora, jax.random.key(1))
  new = add_lora(base, lora, jax.random.key(1))
  assert jax.tree.structure(old) == jax.tree.structure(new)
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(TypeError, match="LoraConfig"):
    add_lora(base, CFG, jax.random.key(1), jax.random.key(2))


def test_rank_larger_than_matrix_is_rejected(base):
  with pytest.raises(ValueError, match="rank"):
    add_lora(base, LoraConfig(rank=1000), jax.random.key(0))


def test_labels_split_and_combine(base):
  lora = LoraConfig(rank=2, targets="attention")
  p = add_lora(base, lora, jax.random.key(1))
  labels = trainable_labels(p, lora)
  trainable, frozen = split_params(p, labels)
  assert set(jax.tree_util.tree_leaves(labels)) == {"trainable", "frozen"}
  d, kv = CFG.hidden_size, CFG.num_key_value_heads * CFG.dh
  per_layer = 2 * ((d + d) + (d + kv) + (d + kv) + (d + d))  # r * (in + out) for q, k, v, o
  assert count_params(trainable) == CFG.num_hidden_layers * per_layer
  assert all(k.startswith("lora_") for path in jax.tree_util.tree_flatten_with_path(trainable)[0]
             for k in [path[0][-1].key])
  assert count_params(trainable) + count_params(frozen) == count_params(p)
  back = combine_params(trainable, frozen)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(p)
  full = trainable_labels(base, None, frozen_patterns=["embed_tokens"])
  assert full["embed_tokens"]["embedding"] == "frozen" and full["norm"]["scale"] == "trainable"
  with pytest.raises(ValueError, match="add_lora"):
    trainable_labels(base, lora)


def test_frozen_leaves_get_no_gradient_or_optimizer_state(base):
  lora = LoraConfig(rank=2)
  p = add_lora(base, lora, jax.random.key(1))
  trainable, frozen = split_params(p, trainable_labels(p, lora))

  def loss(tr):
    return Llama(CFG, lora).apply({"params": combine_params(tr, frozen)}, TOKENS).mean()

  grads = jax.grad(loss)(trainable)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
  state = optax.adamw(1e-3).init(trainable)
  # Adam keeps two moments per trainable leaf (+ its int32 step count) and nothing for the base.
  assert tree_bytes(state) == 2 * tree_bytes(trainable) + 4
  assert tree_bytes(state) < 0.2 * tree_bytes(frozen)
  # The optax mask route: same partition, zero updates and no state for frozen leaves.
  tx = optax_mask(optax.adamw(1e-3), trainable_labels(p, lora))
  masked_state = tx.init(p)
  assert tree_bytes(masked_state) == 2 * tree_bytes(trainable) + 4


def test_7b_lora_param_count_via_eval_shape():
  cfg = preset("llama2_7b")
  lora = LoraConfig(rank=16, targets="all")
  shapes = jax.eval_shape(lambda: add_lora(param_shapes(cfg), lora, jax.random.key(0)))
  assert count_params(lora_subtree(shapes)) == 39_976_960  # as PEFT's print_trainable_parameters
  assert count_params(param_shapes(cfg, lora)) == 6_738_415_616 + 39_976_960


def test_lora_params_from_model_init_match_add_lora(base):
  lora = LoraConfig(rank=3, targets="mlp")
  from_init = param_shapes(CFG, lora)
  from_add = jax.eval_shape(lambda: add_lora(base, lora, jax.random.key(0)))
  assert jax.tree_util.tree_map(lambda x: x.shape, from_init) == jax.tree_util.tree_map(
      lambda x: x.shape, from_add)


def test_pissa_init_keeps_the_function(base):
  lora = LoraConfig(rank=4, init="pissa")
  p = add_lora(base, lora, jax.random.key(1))
  assert float(jnp.abs(p["layers_0"]["mlp"]["up_proj"]["lora_b"]).max()) > 0
  np.testing.assert_allclose(_logits(p, lora), _logits(base), atol=1e-4)


def test_lora_dropout_is_active_only_when_training(base):
  lora = LoraConfig(rank=4, dropout=0.5)
  p = _randomize_b(add_lora(base, lora, jax.random.key(1)))
  m = Llama(CFG, lora)
  det = m.apply({"params": p}, TOKENS)
  np.testing.assert_array_equal(det, m.apply({"params": p}, TOKENS))
  train = m.apply({"params": p}, TOKENS, deterministic=False, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(det, train, atol=1e-5)
