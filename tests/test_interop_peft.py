"""PEFT interop: our adapters load in peft, peft's adapters load here, merged exports agree."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.config import LlamaConfig
from lora_jax.interop import hf, peft as peft_io
from lora_jax.lora import LoraConfig, add_lora, merge_lora
from lora_jax.model import Llama, init_params

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-4


def _tokens(seed=0):
  return np.random.default_rng(seed).integers(0, 128, (2, 16)).astype(np.int32)


def _randomize_lora(params, seed=0, scale=0.1):
  """Non-zero lora_b so the adapter changes the logits."""
  rng = np.random.default_rng(seed)

  def f(path, x):
    if path[-1].key == "lora_b":
      return jnp.asarray(rng.normal(0, scale, x.shape), x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(f, params)


def _base(tmp_path, seed=0):
  """A random base model as (config, params, hf_dir)."""
  config = LlamaConfig(**TINY)
  params = jax.tree.map(lambda x: x * 3, init_params(config, jax.random.key(seed)))
  return config, params, hf.save_hf(tmp_path / "base", config, params)


def _logits(config, params, tokens, lora=None):
  return np.asarray(Llama(config, lora).apply({"params": params}, jnp.asarray(tokens)))


def _torch_logits(model, tokens):
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _hf_base(hf_dir):
  transformers = pytest.importorskip("transformers")
  return transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()


# --------------------------------------------------------------------------- ours -> peft
@pytest.mark.interop
@pytest.mark.parametrize("lora", [
    LoraConfig(rank=4, alpha=8, targets="all", dropout=0.05),
    LoraConfig(rank=4, alpha=16, targets="q_proj,v_proj,down_proj", use_rslora=True),
], ids=["lora", "rslora"])
def test_save_peft_loads_in_peft(tmp_path, lora):
  peft = pytest.importorskip("peft")
  pytest.importorskip("torch")
  config, base, base_dir = _base(tmp_path)
  params = _randomize_lora(add_lora(base, lora, jax.random.key(1)))
  out = peft_io.save_peft(tmp_path / "adapter", config, lora, params,
                          base_model_name_or_path=base_dir)
  ac = json.load(open(os.path.join(out, peft_io.ADAPTER_CONFIG)))
  assert ac["r"] == 4 and ac["use_rslora"] == lora.use_rslora
  assert sorted(ac["target_modules"]) == sorted(lora.target_modules)
  model = peft.PeftModel.from_pretrained(_hf_base(base_dir), out).eval()
  tokens = _tokens()
  ours = _logits(config, params, tokens, lora)
  diff = np.max(np.abs(ours - _torch_logits(model, tokens)))
  effect = np.max(np.abs(ours - _logits(config, base, tokens)))
  print(f"save_peft -> peft ({'rslora' if lora.use_rslora else 'lora'}): max|dlogits|={diff:.2e} "
        f"(adapter effect {effect:.2e})")
  assert effect > 100 * TOL  # the adapter matters, so agreement is meaningful
  assert diff < TOL


# --------------------------------------------------------------------------- peft -> ours
def _peft_adapter(tmp_path, base_dir, **kwargs):
  peft = pytest.importorskip("peft")
  torch = pytest.importorskip("torch")
  cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL7, task_type="CAUSAL_LM", **kwargs)
  model = peft.get_peft_model(_hf_base(base_dir), cfg).eval()
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.1)
  model.save_pretrained(tmp_path / "peft_adapter")
  return model, str(tmp_path / "peft_adapter")


@pytest.mark.interop
def test_load_peft_matches_peft(tmp_path):
  config, base, base_dir = _base(tmp_path)
  model, adapter = _peft_adapter(tmp_path, base_dir)
  lora, params = peft_io.load_peft(adapter, config, base)
  assert lora.rank == 4 and lora.lora_alpha == 8.0 and lora.target_modules == tuple(ALL7)
  tokens = _tokens(1)
  ours = _logits(config, params, tokens, lora)
  diff = np.max(np.abs(ours - _torch_logits(model, tokens)))
  print(f"peft -> load_peft: max|dlogits|={diff:.2e}")
  assert np.max(np.abs(ours - _logits(config, base, tokens))) > 100 * TOL
  assert diff < TOL
  # Base params are untouched.
  np.testing.assert_array_equal(params["layers_0"]["mlp"]["up_proj"]["kernel"],
                                base["layers_0"]["mlp"]["up_proj"]["kernel"])


@pytest.mark.interop
def test_merged_export_matches_peft_merge_and_unload(tmp_path):
  transformers = pytest.importorskip("transformers")
  config, base, base_dir = _base(tmp_path)
  model, adapter = _peft_adapter(tmp_path, base_dir, use_rslora=True)
  lora, params = peft_io.load_peft(adapter, config, base)
  assert lora.use_rslora
  merged_dir = hf.save_hf(tmp_path / "merged", config, merge_lora(params, lora))
  ours = transformers.LlamaForCausalLM.from_pretrained(merged_dir).eval()
  theirs = model.merge_and_unload().eval()
  tokens = _tokens(2)
  diff = np.max(np.abs(_torch_logits(ours, tokens) - _torch_logits(theirs, tokens)))
  print(f"merge_lora+save_hf vs peft merge_and_unload: max|dlogits|={diff:.2e}")
  assert diff < TOL


# --------------------------------------------------------------------------- no torch needed
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_peft_round_trip(tmp_path, dtype):
  config = LlamaConfig(**TINY)
  base = jax.tree.map(lambda x: x.astype(dtype), init_params(config, jax.random.key(0)))
  lora = LoraConfig(rank=3, alpha=5.5, targets="attention", dropout=0.1)
  params = _randomize_lora(add_lora(base, lora, jax.random.key(1)))
  out = peft_io.save_peft(tmp_path / "a", config, lora, params)
  loaded_lora, loaded = peft_io.load_peft(out, config, base)
  assert loaded_lora == lora
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
  _, cast = peft_io.load_peft(out, config, base, dtype="float32")
  assert cast["layers_1"]["self_attn"]["o_proj"]["lora_b"].dtype == jnp.float32


def test_peft_key_mapping():
  key = peft_io.peft_key(3, "up_proj", "lora_b")
  assert key == "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight"
  assert peft_io.peft_key_to_path(key) == ("layers_3", "mlp", "up_proj", "lora_b")
  assert peft_io.peft_key_to_path("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight") is None


def test_target_module_forms(tmp_path):
  """PEFT accepts suffixes, full names, regexes and "all-linear"; all must resolve the same."""
  resolve = lambda t: peft_io._resolve_targets(t, 2, "adapter_config.json")  # noqa: E731
  assert resolve(["self_attn.q_proj", "v_proj"]) == ("q_proj", "v_proj")
  assert resolve(r".*\.(gate|up)_proj") == ("gate_proj", "up_proj")
  assert resolve("all-linear") == tuple(ALL7)
  with pytest.raises(ValueError, match="only some layers"):
    resolve(["model.layers.0.self_attn.q_proj"])
  with pytest.raises(ValueError, match="LM head"):
    resolve(["q_proj", "lm_head"])


def test_save_peft_refuses_mismatched_params(tmp_path):
  config = LlamaConfig(**TINY)
  lora = LoraConfig(rank=2, targets="mlp")
  params = add_lora(init_params(config, jax.random.key(0)), lora, jax.random.key(1))
  with pytest.raises(ValueError, match="rank 4 implies"):
    peft_io.save_peft(tmp_path / "a", config, lora.replace(rank=4), params)
  with pytest.raises(ValueError, match="lora_a: missing"):
    peft_io.save_peft(tmp_path / "a", config, lora.replace(targets="all"), params)
  assert not os.path.exists(tmp_path / "a")


# --------------------------------------------------------------------------- CLI
def test_cli_export_peft(tmp_path, capsys):
  from lora_jax.cli import main
  from lora_jax.interop import native
  config, base, base_dir = _base(tmp_path)
  lora = LoraConfig(rank=4, alpha=8, targets="all", use_rslora=True)
  params = _randomize_lora(add_lora(base, lora, jax.random.key(1)))
  ck = native.save_checkpoint(tmp_path / "ck", config, params, lora,
                              metadata={"base_model_name_or_path": base_dir})
  assert main(["export-peft", ck, str(tmp_path / "adapter"),
               "--merged-hf", str(tmp_path / "merged")]) == 0
  assert "wrote PEFT adapter" in capsys.readouterr().out
  ac = json.load(open(tmp_path / "adapter" / peft_io.ADAPTER_CONFIG))
  assert ac["base_model_name_or_path"] == base_dir and ac["use_rslora"] is True
  # The adapter dir names its local base, so load_model finds it on its own.
  _, loaded, loaded_lora = native.load_model(tmp_path / "adapter")
  assert loaded_lora == lora
  tokens = _tokens(3)
  want = _logits(config, params, tokens, lora)
  assert np.max(np.abs(_logits(config, loaded, tokens, loaded_lora) - want)) == 0
  merged_config, merged = hf.load_hf(tmp_path / "merged")
  assert np.max(np.abs(_logits(merged_config, merged, tokens) - want)) < TOL
