"""Run config: loading, --config.* overrides with type coercion, and errors that name the key."""

import json
import os

import pytest

from lora_jax import config as rc
from lora_jax.sharding import mesh_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LORA = os.path.join(ROOT, "configs", "tiny_lora.py")
TINY_FULL = os.path.join(ROOT, "configs", "tiny_full.py")


def _valid(**train):
  c = rc.default_config()
  c.train.steps = 10
  for k, v in train.items():
    c.train[k] = v
  return c


def test_tiny_configs_load_and_validate():
  for path in (TINY_LORA, TINY_FULL):
    cfg = rc.load_config(path, [])
    rc.validate_config(cfg, num_devices=1)
  assert rc.load_config(TINY_LORA).lora.enabled and not rc.load_config(TINY_FULL).lora.enabled


def test_overrides_coerce_to_the_default_type():
  cfg = rc.load_config(TINY_LORA, ["--config.optimizer.lr=3e-4", "train.steps=12",
                                   "lora.use_rslora=true", "train.epochs=2",
                                   "model.overrides.rope_theta=500000.0", "data.path=x.jsonl"])
  assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
  assert cfg.train.steps == 12 and isinstance(cfg.train.steps, int)
  assert cfg.lora.use_rslora is True
  assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
  assert cfg.model.overrides.rope_theta == 500000.0
  assert cfg.data.path == "x.jsonl"


@pytest.mark.parametrize("override, key", [
    ("optimizer.learning_rate=1", "optimizer.learning_rate"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("lora.enabled=maybe", "lora.enabled"),
    ("model.overrides.not_a_field=1", "model.overrides.not_a_field"),
    ("optimizer=1", "optimizer"),
])
def test_bad_overrides_name_the_key(override, key):
  with pytest.raises(rc.ConfigError) as e:
    rc.load_config(TINY_LORA, [override])
  assert e.value.key == key and str(e.value).startswith(key)


@pytest.mark.parametrize("key, value, num_devices", [
    ("lora.rank", 0, None),
    ("lora.targets", "qkv_proj", None),
    ("lora.dropout", 1.5, None),
    ("optimizer.name", "sgd", None),
    ("optimizer.lr", -1.0, None),
    ("schedule.name", "linear", None),
    ("schedule.warmup_fraction", 1.5, None),
    ("model.preset", "llama9", None),
    ("model.hf_path", "/nonexistent/model", None),
    ("model.dtype", "float8", None),
    ("train.microbatches", 3, None),
    ("train.export", "zip", None),
    ("train.keep_steps", "10,x", None),
    ("data.source", "csv", None),
    ("mesh.tensor", 3, 8),
    ("train.global_batch", 12, 8),
    ("full_ft_frozen", "emb(", None),
])
def test_invalid_values_name_the_key(key, value, num_devices):
  cfg = _valid()
  section, _, name = key.rpartition(".")
  (cfg[section] if section else cfg)[name] = value
  with pytest.raises(rc.ConfigError) as e:
    rc.validate_config(cfg, num_devices=num_devices)
  assert e.value.key.startswith(key.split(".")[0]), str(e.value)
  assert key in str(e.value) or e.value.key == "mesh", str(e.value)


def test_length_and_batch_rules():
  c = _valid(steps=0)
  with pytest.raises(rc.ConfigError, match="train.steps"):
    rc.validate_config(c)
  c = _valid(global_batch=8, microbatches=4)
  rc.validate_config(c, num_devices=2)  # 8 % (2 * 4) == 0
  with pytest.raises(rc.ConfigError, match="train.global_batch"):
    rc.validate_config(c, num_devices=4)  # 8 % (4 * 4) != 0


def test_mesh_shape_resolution():
  assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  assert mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  with pytest.raises(rc.ConfigError, match="mesh"):
    mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(rc.ConfigError, match="mesh"):
    mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def test_config_file_with_unknown_key_is_rejected(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("from lora_jax.config import default_config\n"
                  "def get_config():\n  c = default_config()\n  c.train.stepz = 3\n  return c\n")
  with pytest.raises(rc.ConfigError) as e:
    rc.load_config(str(path))
  assert e.value.key == "train.stepz"
  with pytest.raises(rc.ConfigError, match="config"):
    rc.load_config(str(tmp_path / "missing.py"))


def test_dict_round_trip_and_diff():
  a = rc.load_config(TINY_LORA)
  b = rc.from_dict(json.loads(json.dumps(rc.to_dict(a))))
  assert rc.diff(a, b) == []
  b.optimizer.lr = 1.0
  b.train.log_every = 7  # safe to change on resume: not reported
  assert [k for k, _, _ in rc.diff(a, b)] == ["optimizer.lr"]


def test_lora_config_alpha_defaults_to_two_rank():
  c = _valid()
  c.lora.rank, c.lora.alpha = 8, 0.0
  assert rc.lora_config(c).lora_alpha == 16.0
  c.lora.enabled = False
  assert rc.lora_config(c) is None


def test_cli_collects_config_overrides(capsys):
  from lora_jax.cli import main
  rc_ = main(["train", "--config", TINY_LORA, "--config.optimizer.lr=5e-4",
              "--config.train.steps", "7", "--print-config"])
  out = capsys.readouterr().out
  assert rc_ == 0 and "lr: 0.0005" in out and "steps: 7" in out
  assert main(["train", "--config", TINY_LORA, "--config.optimizer.nope=1"]) == 2
  assert "optimizer.nope" in capsys.readouterr().err


def test_split_overrides_takes_both_command_line_forms():
  words = ["--config.a.b=1", "--config.c", "2", "--force", "--config.d", "--print-config", "x"]
  assert rc.split_overrides(words) == (["a.b=1", "c=2", "d"], ["--force", "--print-config", "x"])
  assert rc.parse_override("--config.a.b=x=y") == rc.parse_override("a.b=x=y") == ("a.b", "x=y")
  with pytest.raises(rc.ConfigError) as e:
    rc.parse_override("--config.d")
  assert e.value.key == "d"


@pytest.mark.parametrize("field, value, key", [
    ("rank", 0, "lora.rank"), ("rank", 2.5, "lora.rank"), ("alpha", -1.0, "lora.alpha"),
    ("dropout", 1.0, "lora.dropout"), ("init", "svd", "lora.init"),
    ("targets", "q_proj,nope", "lora.targets")])
def test_lora_config_errors_carry_the_key(field, value, key):
  from lora_jax.lora import LoraConfig
  with pytest.raises(rc.ConfigError) as e:
    LoraConfig(**{field: value})
  assert e.value.key == key


def test_model_config_errors_name_the_key(tmp_path):
  c = _valid()
  c.model.overrides.num_key_value_heads = 3  # 4 query heads are not a multiple of 3
  with pytest.raises(rc.ConfigError) as e:
    rc.model_config_from(c)
  assert e.value.key == "model.overrides"
  (tmp_path / "config.json").write_text('{"vocab_size": 8}')  # missing required keys
  c = _valid()
  c.model.hf_path = str(tmp_path)
  with pytest.raises(rc.ConfigError) as e:
    rc.model_config_from(c)
  assert e.value.key == "model.hf_path" and "config.json" in str(e.value)


def test_mesh_is_checked_without_devices_too():
  c = _valid()
  c.mesh.data, c.mesh.fsdp = -1, -1
  with pytest.raises(rc.ConfigError) as e:
    rc.validate_config(c)
  assert e.value.key == "mesh.fsdp" and "at most one" in str(e.value)
  c.mesh.fsdp = 0
  with pytest.raises(rc.ConfigError) as e:
    rc.validate_config(c)
  assert e.value.key == "mesh.fsdp"
