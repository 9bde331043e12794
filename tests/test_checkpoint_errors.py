"""Bad checkpoints fail with clear errors naming the file and key (issue [7/7]), and the
lora-jax native format round-trips."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_jax.cli import main
from lora_jax.config import LlamaConfig
from lora_jax.interop import hf, native, peft
from lora_jax.lora import LoraConfig, add_lora
from lora_jax.model import init_params

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def model():
  config = LlamaConfig(**TINY)
  return config, init_params(config, jax.random.key(0))


@pytest.fixture
def hf_dir(tmp_path, model):
  return hf.save_hf(tmp_path / "hf", *model)


def _edit(file, fn):
  tensors = load_file(file)
  fn(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def _lora_params(model, lora):
  config, base = model
  params = add_lora(base, lora, jax.random.key(1))
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if p[-1].key == "lora_b" else x, params)


# --------------------------------------------------------------------------- HF dirs
def test_hf_missing_key(hf_dir):
  _edit(os.path.join(hf_dir, hf.SINGLE_FILE), lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match="missing keys") as e:
    hf.load_hf(hf_dir)
  assert "model.layers.1.mlp.up_proj.weight" in str(e.value)
  assert hf.SINGLE_FILE in str(e.value)


def test_hf_extra_key(hf_dir):
  _edit(os.path.join(hf_dir, hf.SINGLE_FILE),
        lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}))
  with pytest.raises(ValueError, match="unexpected keys") as e:
    hf.load_hf(hf_dir)
  assert "model.layers.0.self_attn.q_proj.bias" in str(e.value)


def test_hf_ignores_rotary_buffers(hf_dir):
  _edit(os.path.join(hf_dir, hf.SINGLE_FILE),
        lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))
  config, _ = hf.load_hf(hf_dir)
  assert config.num_hidden_layers == 2


def test_hf_wrong_shape(hf_dir):
  _edit(os.path.join(hf_dir, hf.SINGLE_FILE), lambda t: t.update({Q0: np.zeros((16, 32), np.float32)}))
  with pytest.raises(ValueError, match="shape mismatches") as e:
    hf.load_hf(hf_dir)
  assert f"{Q0}: file has [16, 32]" in str(e.value) and "[32, 32]" in str(e.value)


def test_hf_wrong_dtype(hf_dir):
  _edit(os.path.join(hf_dir, hf.SINGLE_FILE),
        lambda t: t.update({"model.norm.weight": np.ones(32, np.int32)}))
  with pytest.raises(ValueError, match="unsupported dtypes") as e:
    hf.load_hf(hf_dir)
  assert "model.norm.weight: I32" in str(e.value)


def test_hf_reports_all_problems_at_once(hf_dir):
  def damage(t):
    t.pop("model.norm.weight")
    t["extra.weight"] = np.zeros(2, np.float32)
    t[Q0] = np.zeros((8, 8), np.float32)
    t["model.layers.1.input_layernorm.weight"] = np.ones(32, np.int64)
  _edit(os.path.join(hf_dir, hf.SINGLE_FILE), damage)
  with pytest.raises(ValueError) as e:
    hf.load_hf(hf_dir)
  msg = str(e.value)
  for part in ("missing keys (1)", "model.norm.weight", "unexpected keys (1)", "extra.weight",
               "shape mismatches (1)", Q0, "unsupported dtypes", "input_layernorm.weight: I64"):
    assert part in msg, part


def test_hf_truncated_safetensors(hf_dir):
  file = os.path.join(hf_dir, hf.SINGLE_FILE)
  data = open(file, "rb").read()
  open(file, "wb").write(data[: len(data) // 2])
  with pytest.raises(ValueError, match="truncated or corrupt") as e:
    hf.load_hf(hf_dir)
  assert file in str(e.value)


def test_hf_missing_config(hf_dir):
  os.remove(os.path.join(hf_dir, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_hf(hf_dir)


def test_hf_no_weights(tmp_path, hf_dir):
  os.remove(os.path.join(hf_dir, hf.SINGLE_FILE))
  open(os.path.join(hf_dir, "pytorch_model.bin"), "wb").write(b"\0")
  with pytest.raises(FileNotFoundError, match="safe_serialization=True"):
    hf.load_hf(hf_dir)


def test_hf_unsupported_architecture(hf_dir):
  file = os.path.join(hf_dir, "config.json")
  cfg = json.load(open(file))
  cfg.update(model_type="qwen2", attention_bias=True)
  json.dump(cfg, open(file, "w"))
  with pytest.raises(ValueError, match="model_type='qwen2'.*attention_bias") as e:
    hf.load_hf(hf_dir)
  assert file in str(e.value)


def test_hf_index_names_missing_shard(tmp_path, model):
  d = hf.save_hf(tmp_path / "sharded", *model, max_shard_bytes=20_000)
  os.remove(os.path.join(d, "model-00002-of-" + sorted(os.listdir(d))[-2][-17:]))
  with pytest.raises(ValueError, match="model-00002-of-.*does not exist") as e:
    hf.load_hf(d)
  assert hf.INDEX_FILE in str(e.value)


def test_save_hf_rejects_wrong_params(tmp_path, model):
  config, params = model
  with pytest.raises(ValueError, match=r"(?s)missing params.*lm_head/kernel"):
    hf.save_hf(tmp_path / "m", config, {k: v for k, v in params.items() if k != "lm_head"})
  with pytest.raises(ValueError, match="shape mismatches"):
    hf.save_hf(tmp_path / "m", config.replace(intermediate_size=48), params)
  assert not os.path.exists(tmp_path / "m")


# --------------------------------------------------------------------------- PEFT adapters
@pytest.fixture
def adapter_dir(tmp_path, model):
  lora = LoraConfig(rank=4, alpha=8, targets="attention")
  return peft.save_peft(tmp_path / "adapter", model[0], lora, _lora_params(model, lora))


def _edit_config(adapter_dir, **changes):
  file = os.path.join(adapter_dir, peft.ADAPTER_CONFIG)
  cfg = json.load(open(file))
  cfg.update(changes)
  json.dump(cfg, open(file, "w"))
  return file


def test_peft_unknown_target(adapter_dir, model):
  file = _edit_config(adapter_dir, target_modules=["q_proj", "qkv_proj"])
  with pytest.raises(ValueError, match=r"target_modules \['qkv_proj'\] match no module") as e:
    peft.load_peft(adapter_dir, *model)
  assert file in str(e.value)


def test_peft_rank_mismatch(adapter_dir, model):
  _edit_config(adapter_dir, r=8)
  with pytest.raises(ValueError, match="rank mismatches") as e:
    peft.load_peft(adapter_dir, *model)
  msg = str(e.value)
  assert peft.ADAPTER_WEIGHTS in msg and "self_attn.q_proj.lora_A.weight: rank 4" in msg
  assert "r=8" in msg


def test_peft_shapes_do_not_fit(adapter_dir):
  other = LlamaConfig(**dict(TINY, hidden_size=48, num_attention_heads=4))
  with pytest.raises(ValueError, match="shape mismatches") as e:
    peft.load_peft(adapter_dir, other, init_params(other, jax.random.key(0)))
  assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: shape [4, 32]" in str(e.value)


def test_peft_missing_and_extra_tensors(adapter_dir, model):
  def damage(t):
    t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = np.zeros((4, 32), np.float32)
  _edit(os.path.join(adapter_dir, peft.ADAPTER_WEIGHTS), damage)
  with pytest.raises(ValueError) as e:
    peft.load_peft(adapter_dir, *model)
  msg = str(e.value)
  assert "missing tensors (1)" in msg and "layers.1.self_attn.v_proj.lora_B.weight" in msg
  assert "unexpected tensors (1)" in msg and "layers.0.mlp.up_proj.lora_A.weight" in msg


@pytest.mark.parametrize("key,value", [("use_dora", True), ("rank_pattern", {"q_proj": 8}),
                                       ("layers_to_transform", [0]), ("modules_to_save", ["lm_head"]),
                                       ("init_lora_weights", "pissa"), ("peft_type", "IA3")])
def test_peft_unsupported_features(adapter_dir, model, key, value):
  file = _edit_config(adapter_dir, **{key: value})
  with pytest.raises(ValueError, match=key) as e:
    peft.load_peft(adapter_dir, *model)
  assert file in str(e.value)


def test_peft_truncated_weights(adapter_dir, model):
  file = os.path.join(adapter_dir, peft.ADAPTER_WEIGHTS)
  open(file, "wb").write(open(file, "rb").read()[:100])
  with pytest.raises(ValueError, match="truncated or corrupt") as e:
    peft.load_peft(adapter_dir, *model)
  assert file in str(e.value)


def test_peft_needs_base_params(adapter_dir, model):
  config, _ = model
  lora, params = peft.load_peft(adapter_dir, *model)
  with pytest.raises(ValueError, match="already hold LoRA leaves"):
    peft.load_peft(adapter_dir, config, params)


# --------------------------------------------------------------------------- native checkpoints
def test_native_round_trip(tmp_path, model):
  config, _ = model
  lora = LoraConfig(rank=2, alpha=3.0, targets=("q_proj", "down_proj"), use_rslora=True)
  params = _lora_params(model, lora)
  d = native.save_checkpoint(tmp_path / "ck", config, params, lora, metadata={"step": 7})
  config2, params2, lora2 = native.load_checkpoint(d)
  assert config2 == config and lora2 == lora
  assert native.read_checkpoint_info(d)["metadata"] == {"step": 7}
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  config3, params3, _ = native.load_checkpoint(d, dtype="bfloat16")
  assert config3.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(params3)} == {np.dtype("bfloat16")}


@pytest.mark.parametrize("damage", ["data", "metadata"])
def test_native_corrupt_params(tmp_path, model, damage):
  d = native.save_checkpoint(tmp_path / "ck", *model)
  params_dir = os.path.join(d, native.PARAMS_DIR)
  if damage == "metadata":
    os.remove(os.path.join(params_dir, "_METADATA"))
  else:  # truncate the array data files (orbax's OCDBT layout: ocdbt.process_N/d/*)
    damaged = 0
    for root, _, files in os.walk(params_dir):
      if "ocdbt.process_" in root and os.path.basename(root) == "d":
        for f in files:
          path = os.path.join(root, f)
          open(path, "wb").write(open(path, "rb").read()[:10])
          damaged += 1
    assert damaged
  with pytest.raises(ValueError, match="cannot restore") as e:
    native.load_checkpoint(d)
  assert params_dir in str(e.value)


def test_native_bad_metadata(tmp_path, model):
  d = native.save_checkpoint(tmp_path / "ck", *model)
  file = os.path.join(d, native.META_FILE)
  meta = json.load(open(file))
  json.dump(dict(meta, format_version=99), open(file, "w"))
  with pytest.raises(ValueError, match="format_version 99"):
    native.load_checkpoint(d)
  json.dump(dict(meta, model=dict(meta["model"], n_layers=3)), open(file, "w"))
  with pytest.raises(ValueError, match=r"unknown fields in 'model': \['n_layers'\]") as e:
    native.load_checkpoint(d)
  assert file in str(e.value)
  open(file, "w").write("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    native.load_checkpoint(d)


def test_native_config_params_mismatch(tmp_path, model):
  config, params = model
  d = native.save_checkpoint(tmp_path / "ck", config, params)
  file = os.path.join(d, native.META_FILE)
  meta = json.load(open(file))
  meta["model"]["intermediate_size"] = 48
  json.dump(meta, open(file, "w"))
  with pytest.raises(ValueError, match="do not match the configs"):
    native.load_checkpoint(d)


def test_load_model_detects_formats(tmp_path, model, adapter_dir):
  config, base = model
  hf_dir = hf.save_hf(tmp_path / "base", config, base)
  assert native.load_model(hf_dir)[2] is None
  lora_a, params_a = native.load_model(hf_dir, adapter=adapter_dir)[1:][::-1]
  assert lora_a.rank == 4
  with pytest.raises(ValueError, match="not a local directory"):
    native.load_model(adapter_dir)  # base_model_name_or_path unset
  _edit_config(adapter_dir, base_model_name_or_path=hf_dir)
  _, params_b, lora_b = native.load_model(adapter_dir)
  assert lora_b == lora_a
  ck = native.save_checkpoint(tmp_path / "ck", config, params_b, lora_b)
  assert native.load_model(ck)[2] == lora_b
  with pytest.raises(ValueError, match="already holds LoRA"):
    native.load_model(ck, adapter=adapter_dir)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match="not a model directory"):
    native.load_model(tmp_path / "empty")


# --------------------------------------------------------------------------- CLI
def test_cli_bad_input_exit_code_2(tmp_path, model, adapter_dir, capsys):
  assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
  assert "nope" in capsys.readouterr().err
  ck = native.save_checkpoint(tmp_path / "ck", *model)
  assert main(["export-peft", ck, str(tmp_path / "a")]) == 2
  assert "has no LoRA adapters" in capsys.readouterr().err
  hf_dir = hf.save_hf(tmp_path / "hf", *model)
  assert main(["export-peft", hf_dir, str(tmp_path / "a")]) == 2
  assert "not a lora-jax checkpoint" in capsys.readouterr().err
  # A non-model, non-empty output dir is never replaced.
  (tmp_path / "keep").mkdir()
  (tmp_path / "keep" / "x.txt").write_text("x")
  assert main(["convert", hf_dir, str(tmp_path / "keep")]) == 2
  assert "refusing" in capsys.readouterr().err and (tmp_path / "keep" / "x.txt").exists()
  with pytest.raises(SystemExit) as e:
    main(["convert", hf_dir, str(tmp_path / "o"), "--max-shard-size", "lots"])
  assert e.value.code == 2
  shutil.rmtree(ck)
