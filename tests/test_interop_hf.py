"""HF interop: parity with transformers' LlamaForCausalLM, bit-exact save/load, sharding."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.config import LlamaConfig
from lora_jax.interop import hf
from lora_jax.model import Llama, init_params

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5)
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}
VARIANTS = [("default", False), ("linear", False), ("llama3", False), ("default", True),
            ("llama3", True)]
TOL = 1e-4


def _tokens(vocab=128, shape=(2, 24), seed=0):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _our_logits(config, params, tokens):
  return np.asarray(Llama(config).apply({"params": params}, jnp.asarray(tokens)))


def _random_params(config, seed=0):
  """init_params with non-trivial norm scales (so a mixed-up norm mapping shows)."""
  params = init_params(config, jax.random.key(seed))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(seed)
  out = []
  for path, x in leaves:
    if path[-1].key == "scale":
      x = x + jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype)
    out.append(x * 3 if path[-1].key != "scale" else x)
  return jax.tree_util.tree_unflatten(treedef, out)


def _hf_model(rope, tied, seed=0):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
  if ROPES[rope]:
    rope_parameters.update(ROPES[rope])
  cfg = transformers.LlamaConfig(**TINY, tie_word_embeddings=tied, initializer_range=0.1,
                                 rope_parameters=rope_parameters)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def _hf_logits(model, tokens):
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _assert_bitwise_equal(a, b):
  fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (p, x), (_, y) in zip(fa, fb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype, p
    assert x.shape == y.shape, p
    assert x.tobytes() == y.tobytes(), p


# --------------------------------------------------------------------------- parity with HF
@pytest.mark.interop
@pytest.mark.parametrize("rope,tied", VARIANTS)
def test_load_hf_matches_transformers(tmp_path, rope, tied):
  model = _hf_model(rope, tied)
  model.save_pretrained(tmp_path / "hf")
  config, params = hf.load_hf(tmp_path / "hf")
  assert config.tie_word_embeddings == tied
  assert ("lm_head" in params) == (not tied)
  assert config.num_key_value_heads == 2 and config.rope_theta == 500000.0
  if ROPES[rope]:
    assert config.rope_scaling["rope_type"] == rope
  tokens = _tokens()
  diff = np.max(np.abs(_our_logits(config, params, tokens) - _hf_logits(model, tokens)))
  print(f"load_hf parity {rope} tied={tied}: max|dlogits|={diff:.2e}")
  assert diff < TOL


@pytest.mark.interop
@pytest.mark.parametrize("rope,tied", VARIANTS)
def test_save_hf_loads_in_transformers(tmp_path, rope, tied):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  config = LlamaConfig(**TINY, rope_theta=500000.0, rope_scaling=ROPES[rope],
                       tie_word_embeddings=tied)
  params = _random_params(config, seed=1)
  hf.save_hf(tmp_path / "out", config, params)
  model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
  tokens = _tokens(seed=1)
  diff = np.max(np.abs(_our_logits(config, params, tokens) - _hf_logits(model, tokens)))
  print(f"save_hf parity {rope} tied={tied}: max|dlogits|={diff:.2e}")
  assert diff < TOL


@pytest.mark.interop
def test_load_hf_sharded_from_transformers(tmp_path):
  model = _hf_model("default", False)
  model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "hf" / hf.INDEX_FILE)
  config, params = hf.load_hf(tmp_path / "hf")
  tokens = _tokens()
  assert np.max(np.abs(_our_logits(config, params, tokens) - _hf_logits(model, tokens))) < TOL


@pytest.mark.interop
def test_load_hf_keeps_bf16_from_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  model = _hf_model("default", False).to(torch.bfloat16)
  model.save_pretrained(tmp_path / "hf")
  config, params = hf.load_hf(tmp_path / "hf")
  assert config.param_dtype == "bfloat16"
  want = model.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
  got = params["layers_1"]["mlp"]["down_proj"]["kernel"]
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), want)


@pytest.mark.interop
def test_load_hf_accepts_tied_head_copy(tmp_path):
  """Some exporters write lm_head.weight even when tied; accept it if it equals the embedding."""
  from safetensors.numpy import load_file, save_file
  config = LlamaConfig(**TINY, tie_word_embeddings=True)
  params = _random_params(config)
  d = hf.save_hf(tmp_path / "m", config, params)
  file = os.path.join(d, hf.SINGLE_FILE)
  tensors = load_file(file)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  save_file(tensors, file, metadata={"format": "pt"})
  _, loaded = hf.load_hf(d)
  assert "lm_head" not in loaded
  tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
  save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    hf.load_hf(d)


# --------------------------------------------------------------------------- round trips (no torch)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_round_trip_bitwise(tmp_path, dtype):
  config = LlamaConfig(**TINY, rope_scaling=ROPES["llama3"])
  params = jax.tree.map(lambda x: x.astype(dtype), _random_params(config))
  out = hf.save_hf(tmp_path / "m", config, params)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == dtype
  loaded_config, loaded = hf.load_hf(out)
  _assert_bitwise_equal(params, loaded)
  assert loaded_config.param_dtype == dtype
  assert loaded_config.replace(param_dtype="float32") == config
  # dtype= casts on load.
  _, cast = hf.load_hf(out, dtype="float32")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(cast))


def test_sharded_write_and_read(tmp_path):
  config = LlamaConfig(**TINY)
  params = _random_params(config)
  out = hf.save_hf(tmp_path / "m", config, params, max_shard_bytes=20_000)
  files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  n = len(files)
  assert n > 2 and files[0] == f"model-00001-of-{n:05d}.safetensors"
  index = json.load(open(os.path.join(out, hf.INDEX_FILE)))
  total = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
  assert index["metadata"]["total_size"] == total
  assert set(index["weight_map"].values()) == set(files)
  assert len(index["weight_map"]) == len(jax.tree.leaves(params))
  _, loaded = hf.load_hf(out)
  _assert_bitwise_equal(params, loaded)


def test_open_hf_tensors_is_lazy_mapping(tmp_path):
  config = LlamaConfig(**TINY)
  params = _random_params(config)
  out = hf.save_hf(tmp_path / "m", config, params, max_shard_bytes=20_000)
  tensors = hf.open_hf_tensors(out)
  assert tensors.config == config
  assert len(tensors) == len(jax.tree.leaves(params))
  q = params["layers_1"]["self_attn"]["q_proj"]["kernel"]
  path = ("layers_1", "self_attn", "q_proj", "kernel")
  assert tensors.shape(path) == q.shape  # metadata only
  np.testing.assert_array_equal(tensors[path], q)
  np.testing.assert_array_equal(tensors["model.layers.1.self_attn.q_proj.weight"], q)
  assert "model.norm.weight" in tensors and ("norm", "scale") in tensors
  assert ("nope",) not in tensors


def test_key_mapping_round_trip():
  config = LlamaConfig(**TINY)
  from flax import traverse_util
  for path in traverse_util.flatten_dict(init_params(config, jax.random.key(0))):
    key = hf.path_to_hf_key(path)
    assert hf.hf_key_to_path(key) == path
  assert hf.hf_key_to_path("model.layers.0.self_attn.rotary_emb.inv_freq") is None
  assert hf.hf_key_to_path("model.layers.0.mlp.q_proj.weight") is None
  with pytest.raises(KeyError):
    hf.path_to_hf_key(("layers_0", "self_attn", "q_proj", "lora_a"))


def test_save_hf_refuses_lora_leaves_unless_merging(tmp_path):
  from lora_jax.lora import LoraConfig, add_lora, merge_lora
  config = LlamaConfig(**TINY)
  lora = LoraConfig(rank=2, targets="all")
  params = add_lora(_random_params(config), lora, jax.random.key(1))
  params["layers_0"]["mlp"]["up_proj"]["lora_b"] += 0.5
  with pytest.raises(ValueError, match="merge_lora"):
    hf.save_hf(tmp_path / "m", config, params)
  assert not os.path.exists(tmp_path / "m")
  hf.save_hf(tmp_path / "m", config, params, lora_config=lora)
  _, loaded = hf.load_hf(tmp_path / "m")
  _assert_bitwise_equal(merge_lora(params, lora), loaded)


def test_save_hf_replaces_only_model_dirs(tmp_path):
  config = LlamaConfig(**TINY)
  params = _random_params(config)
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "todo.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="refusing"):
    hf.save_hf(tmp_path / "notes", config, params)
  assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
  out = hf.save_hf(tmp_path / "m", config, params)
  params2 = _random_params(config, seed=3)
  hf.save_hf(out, config, params2)  # overwriting a model dir is fine
  _assert_bitwise_equal(params2, hf.load_hf(out)[1])
  assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temp dirs left


# --------------------------------------------------------------------------- CLI
def test_cli_convert_round_trip(tmp_path, capsys):
  from lora_jax.cli import main
  from lora_jax.interop import native
  config = LlamaConfig(**TINY, rope_scaling=ROPES["linear"])
  params = _random_params(config)
  src = hf.save_hf(tmp_path / "hf", config, params)
  assert main(["convert", src, str(tmp_path / "ck")]) == 0  # HF -> lora-jax (auto)
  assert "wrote lora-jax" in capsys.readouterr().out
  config2, params2, lora = native.load_checkpoint(tmp_path / "ck")
  assert lora is None and config2 == config
  _assert_bitwise_equal(params, params2)
  info = native.read_checkpoint_info(tmp_path / "ck")
  assert info["metadata"]["base_model_name_or_path"] == src
  assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "hf2"), "--dtype", "bfloat16",
               "--max-shard-size", "20KB"]) == 0  # lora-jax -> HF (auto), sharded
  assert os.path.exists(tmp_path / "hf2" / hf.INDEX_FILE)
  _, params3 = hf.load_hf(tmp_path / "hf2")
  _assert_bitwise_equal(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), params3)


def test_cli_convert_lora_checkpoint_merges(tmp_path):
  from lora_jax.cli import main
  from lora_jax.interop import native
  from lora_jax.lora import LoraConfig, add_lora, merge_lora
  config = LlamaConfig(**TINY)
  lora = LoraConfig(rank=2, targets="mlp")
  params = add_lora(_random_params(config), lora, jax.random.key(2))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if p[-1].key == "lora_b" else x, params)
  native.save_checkpoint(tmp_path / "ck", config, params, lora)
  assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
  _, merged = hf.load_hf(tmp_path / "hf")
  want = merge_lora(params, lora)  # jax here, numpy in the CLI: equal up to matmul rounding
  assert jax.tree.structure(want) == jax.tree.structure(merged)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(merged)):
    np.testing.assert_allclose(np.asarray(x), y, rtol=1e-6, atol=1e-7)
  assert not np.allclose(merged["layers_0"]["mlp"]["up_proj"]["kernel"],
                         params["layers_0"]["mlp"]["up_proj"]["kernel"])
