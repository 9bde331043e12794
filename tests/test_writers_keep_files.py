"""Writers never delete what they did not write (issue: `convert` into an HF dir that also held a
tokenizer and a README left only config.json and the weights)."""

import os

import jax
import numpy as np
import pytest

from lora_jax.cli import main
from lora_jax.config import LlamaConfig
from lora_jax.interop import hf, native, peft
from lora_jax.lora import LoraConfig, add_lora
from lora_jax.model import init_params

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
FOREIGN = {"tokenizer.json": '{"model": {}}', "README.md": "# my model\n"}


def _user_hf_dir(path, config, params):
  """An HF model dir as a user has it: lora-jax-compatible weights plus files lora-jax never writes."""
  hf.save_hf(path, config, params)
  for name, text in FOREIGN.items():
    (path / name).write_text(text)
  return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.fixture(scope="module")
def model():
  config = LlamaConfig(**TINY)
  return config, init_params(config, jax.random.key(0))


def test_convert_refuses_a_dir_with_foreign_files_and_changes_nothing(tmp_path, model, capsys):
  config, params = model
  native.save_checkpoint(tmp_path / "ck", config, params)
  before = _user_hf_dir(tmp_path / "hf", config, jax.tree.map(lambda x: x + 1, params))
  assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "hf"), "--to", "hf"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "README.md" in err and "--overwrite" in err
  assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before


def test_convert_overwrite_replaces_only_its_own_files(tmp_path, model):
  config, params = model
  native.save_checkpoint(tmp_path / "ck", config, params)
  _user_hf_dir(tmp_path / "hf", config, jax.tree.map(lambda x: x + 1, params))
  assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "hf"), "--to", "hf",
               "--overwrite"]) == 0
  names = sorted(os.listdir(tmp_path / "hf"))
  assert names == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
  for name, text in FOREIGN.items():
    assert (tmp_path / "hf" / name).read_text() == text
  _, loaded = hf.load_hf(tmp_path / "hf")
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(x), y)


def test_overwrite_drops_stale_shards_of_an_earlier_export(tmp_path, model):
  config, params = model
  out = tmp_path / "hf"
  hf.save_hf(out, config, params, max_shard_bytes=4000)
  shards = [n for n in os.listdir(out) if n.startswith("model-")]
  assert len(shards) > 1 and (out / hf.INDEX_FILE).exists()
  (out / "README.md").write_text("keep")
  hf.save_hf(out, config, params, overwrite=True)  # one file now
  assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp dirs left


def test_own_previous_output_is_replaced_without_overwrite(tmp_path, model):
  config, params = model
  out = native.save_checkpoint(tmp_path / "ck", config, params)
  native.save_checkpoint(out, config, jax.tree.map(lambda x: x * 2, params))
  _, loaded, _ = native.load_checkpoint(out)
  np.testing.assert_array_equal(np.asarray(loaded["norm"]["scale"]),
                                2 * np.asarray(params["norm"]["scale"]))


def test_peft_export_keeps_a_model_card(tmp_path, model):
  config, params = model
  lora = LoraConfig(rank=2, targets="attention")
  with_lora = add_lora(params, lora, jax.random.key(1))
  out = tmp_path / "adapter"
  peft.save_peft(out, config, lora, with_lora)
  (out / "README.md").write_text("card")
  with pytest.raises(FileExistsError, match="README.md"):
    peft.save_peft(out, config, lora, with_lora)
  peft.save_peft(out, config, lora, with_lora, overwrite=True)
  assert sorted(os.listdir(out)) == ["README.md", peft.ADAPTER_CONFIG, peft.ADAPTER_WEIGHTS]
  assert (out / "README.md").read_text() == "card"


def test_a_file_is_never_replaced_by_a_directory(tmp_path, model):
  config, params = model
  (tmp_path / "x").write_text("data")
  with pytest.raises(FileExistsError, match="not a directory"):
    hf.save_hf(tmp_path / "x", config, params, overwrite=True)
  assert (tmp_path / "x").read_text() == "data"


@pytest.mark.parametrize("command", [
    ["eval", "--model", "MODEL", "--tasks", "gsm8k"],
    ["analyze", "--base", "MODEL", "--finetuned", "MODEL"],
    ["report", "--runs", "MODEL"],
])
def test_commands_refuse_an_out_dir_holding_other_files(tmp_path, capsys, command):
  """Checked before any work: MODEL does not even exist, the refusal comes first."""
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  argv = [str(tmp_path / "missing") if a == "MODEL" else a for a in command]
  assert main(argv + ["--out", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "notes.txt" in err and "--overwrite" in err, err
  assert sorted(os.listdir(out)) == ["notes.txt"]
  # With --overwrite the command goes on (and fails later on the missing model, writing nothing).
  assert main(argv + ["--out", str(out), "--overwrite"]) == 2
  assert "notes.txt" not in capsys.readouterr().err
  assert (out / "notes.txt").read_text() == "mine"


def test_eval_into_its_own_previous_output_needs_no_flag(tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "results.json").write_text("{}")
  (out / "samples_gsm8k.jsonl").write_text("")
  assert main(["eval", "--model", str(tmp_path / "missing"), "--tasks", "gsm8k",
               "--out", str(out)]) == 2
  assert "--overwrite" not in capsys.readouterr().err
