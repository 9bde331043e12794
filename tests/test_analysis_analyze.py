"""`analyze` end to end on tiny models: in-memory params, LoRA leaves, a PEFT adapter dir, output files."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from lora_jax import analysis
from lora_jax.analysis import sources
from lora_jax.config import preset
from lora_jax.lora import LoraConfig
from lora_jax.model import param_shapes

MODULES = ("q_proj", "down_proj")  # two shapes ([64, 64], [176, 64]) keep compile time low


def _random_like(shapes, rng, std=0.02, lora=None):
  """Numpy params with the model's tree layout (`param_shapes`: no init compile)."""
  def fill(path, x):
    if path[-1].key == "lora_b" and lora is None:
      return np.zeros(x.shape, np.float32)
    return (std * rng.standard_normal(x.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny():
  config = preset("tiny")
  base = _random_like(param_shapes(config), np.random.default_rng(0))
  return config, base


def _perturb(params, fn):
  return {k: _perturb(v, fn) if isinstance(v, dict) else fn(v) for k, v in params.items()}


@pytest.fixture(scope="module")
def lora_model(tiny):
  config, base = tiny
  lora = LoraConfig(rank=4, alpha=8.0, targets="all")
  shapes = param_shapes(config, lora)
  rng = np.random.default_rng(0)
  params = _random_like(shapes, rng, lora=lora)
  # the frozen kernels are the base's
  flat_base = dict(jax.tree_util.tree_flatten_with_path(base)[0])
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: flat_base[p] if p[-1].key not in ("lora_a", "lora_b") else x, params)
  return lora, params


def test_full_finetune_in_memory_matches_numpy(tiny):
  config, base = tiny
  rng = np.random.default_rng(1)
  ft = _perturb(base, lambda x: x + np.float32(0.01) * rng.standard_normal(x.shape).astype(np.float32))
  res = analysis.analyze(base, ft, modules=MODULES, variance=0.9, progress=False)
  assert len(res.rows) == config.num_hidden_layers * len(MODULES)
  row = next(r for r in res.rows if r["layer"] == 1 and r["module"] == "down_proj")
  w0 = base["layers_1"]["mlp"]["down_proj"]["kernel"].astype(np.float64)
  w1 = ft["layers_1"]["mlp"]["down_proj"]["kernel"].astype(np.float64)
  s_delta = np.linalg.svd(w1 - w0, compute_uv=False)
  assert row["delta_from"] == "dense" and row["shape"] == [176, 64]
  assert row["rank_delta"] == analysis.rank_at_variance(s_delta, 0.9)
  assert row["rel_delta_norm"] == pytest.approx(np.linalg.norm(w1 - w0) / np.linalg.norm(w0), rel=1e-4)
  np.testing.assert_allclose(res.spectra["down_proj.delta"][1], s_delta, rtol=1e-4, atol=1e-6)
  assert res.spectra["q_proj.base"].shape == (2, 64)
  # random noise is far from low-rank: needs about half the dimensions, like the random baseline
  assert res.summary()["down_proj"]["mean_rank_delta"] > 25


def test_known_rank_update_is_recovered(tiny):
  _, base = tiny
  ft = _perturb(base, lambda x: x)
  k = ft["layers_0"]["self_attn"]["q_proj"]["kernel"]
  u, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((64, 3)))
  ft["layers_0"]["self_attn"]["q_proj"]["kernel"] = k + (u @ u.T).astype(np.float32)  # rank 3, equal sv
  res = analysis.analyze(base, ft, modules="q_proj", layers=[0], variance=0.9, progress=False)
  (row,) = res.rows
  assert row["rank_delta"] == 3 and row["erank_delta"] == pytest.approx(3.0, rel=1e-3)


def test_lora_leaves_use_factor_svd(tiny, lora_model):
  _, base = tiny
  lora, params = lora_model
  res = analysis.analyze(base, params, finetuned_lora=lora, modules=MODULES, intruders=True,
                         progress=False)
  for row in res.rows:
    assert row["delta_from"] == "factors" and row["lora_rank"] == 4
    assert row["rank_delta"] <= 4
    assert len(row["intruder_max_cos"]) == 10
  mod = params["layers_0"]["self_attn"]["q_proj"]
  dense = lora.scale * mod["lora_a"].astype(np.float64) @ mod["lora_b"]
  ref = np.linalg.svd(dense, compute_uv=False)
  np.testing.assert_allclose(res.spectra["q_proj.delta"][0][:4], ref[:4], rtol=1e-4)
  assert np.all(res.spectra["q_proj.delta"][0][4:] == 0)
  ref_ft = np.linalg.svd(mod["kernel"].astype(np.float64) + dense, compute_uv=False)
  np.testing.assert_allclose(res.spectra["q_proj.ft"][0], ref_ft, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="LoraConfig"):
    analysis.analyze(base, params, modules="q_proj", progress=False)


def _write_peft(path, lora, params):
  os.makedirs(path)
  tensors = {}
  for i in range(2):
    for group, module in (("self_attn", "q_proj"), ("mlp", "down_proj")):
      mod = params[f"layers_{i}"][group][module]
      key = f"base_model.model.model.layers.{i}.{group}.{module}"
      tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(mod["lora_a"].T)
      tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(mod["lora_b"].T)
  save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
  with open(os.path.join(path, "adapter_config.json"), "w") as f:
    json.dump({"peft_type": "LORA", "r": lora.rank, "lora_alpha": lora.lora_alpha,
               "target_modules": ["q_proj", "down_proj"], "task_type": "CAUSAL_LM"}, f)


def test_peft_adapter_dir_equals_in_memory(tiny, lora_model, tmp_path):
  _, base = tiny
  lora, params = lora_model
  adapter = str(tmp_path / "adapter")
  _write_peft(adapter, lora, params)
  res_peft = analysis.analyze(base, adapter, modules=MODULES, progress=False)
  res_mem = analysis.analyze(base, params, finetuned_lora=lora, modules=MODULES, progress=False)
  assert res_peft.meta["finetuned"] == adapter
  for key in ("q_proj.delta", "down_proj.ft"):
    np.testing.assert_allclose(res_peft.spectra[key], res_mem.spectra[key], rtol=1e-5, atol=1e-6)
  assert [r["rank_delta"] for r in res_peft.rows] == [r["rank_delta"] for r in res_mem.rows]
  # an untargeted module of the adapter has dW = 0
  res_k = analysis.analyze(base, adapter, modules="k_proj", progress=False)
  assert all(r["rank_delta"] == 0 and r["fro_delta"] == 0 for r in res_k.rows)
  with pytest.raises(ValueError, match="PEFT adapter"):
    sources.open_source(adapter)


def test_save_and_load_roundtrip(tiny, lora_model, tmp_path):
  _, base = tiny
  lora, params = lora_model
  res = analysis.analyze(base, params, finetuned_lora=lora, modules="q_proj", intruders=True,
                         progress=False)
  paths = analysis.save_analysis(res, str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path / "out")) == ["analysis.json", "spectra.npz"]
  doc = json.loads(open(paths["analysis"]).read())
  assert doc["meta"]["variance"] == 0.9 and doc["meta"]["intruders"]["k"] == 10
  assert doc["summary"]["q_proj"]["max_rank_delta"] <= 4
  back = analysis.load_analysis(str(tmp_path / "out"))
  assert back.rows == doc["rows"]
  np.testing.assert_array_equal(back.spectra["q_proj.delta"], res.spectra["q_proj.delta"])
  assert back.rank_by_layer()["q_proj"] == res.rank_by_layer()["q_proj"]


def test_layer_batching_does_not_change_results(tiny):
  _, base = tiny
  rng = np.random.default_rng(3)
  ft = _perturb(base, lambda x: x + np.float32(0.02) * rng.standard_normal(x.shape).astype(np.float32))
  one = analysis.analyze(base, ft, modules="q_proj", layer_batch=1, progress=False)
  both = analysis.analyze(base, ft, modules="q_proj", layer_batch=2, progress=False)
  np.testing.assert_allclose(one.spectra["q_proj.delta"], both.spectra["q_proj.delta"], rtol=1e-5)
  with pytest.raises(ValueError, match="out of range"):
    analysis.analyze(base, ft, modules="q_proj", layers=[5], progress=False)
  with pytest.raises(ValueError, match="unknown module"):
    analysis.parse_modules("q_proj,lm_head")
  assert analysis.parse_modules("mlp,q_proj") == ("q_proj", "gate_proj", "up_proj", "down_proj")


def test_cli_on_hf_dirs_and_peft_adapter(tiny, lora_model, tmp_path, capsys):
  from lora_jax.cli import main
  from lora_jax.interop.hf import save_hf
  from lora_jax.interop.peft import save_peft
  config, base = tiny
  lora, params = lora_model
  base_dir = save_hf(str(tmp_path / "base"), config, base)
  rng = np.random.default_rng(7)
  ft = _perturb(base, lambda x: x + np.float32(0.01) * rng.standard_normal(x.shape).astype(np.float32))
  ft_dir = save_hf(str(tmp_path / "ft"), config, ft)
  out = str(tmp_path / "out")
  rc = main(["analyze", "--base", base_dir, "--finetuned", ft_dir, "--modules", "q_proj,down_proj",
             "--intruders", "--random-n", "64", "--quiet", "--out", out])
  assert rc == 0
  assert sorted(os.listdir(out)) == ["analysis.json", "intruders.png", "rank_by_layer.png",
                                     "spectra.npz", "spectra.png"]
  got = analysis.load_analysis(out)
  want = analysis.analyze(base, ft, modules=MODULES, progress=False)
  np.testing.assert_allclose(got.spectra["down_proj.delta"], want.spectra["down_proj.delta"],
                             rtol=1e-5, atol=1e-7)
  assert got.meta["random_baseline"]["shape"] == [64, 64]
  assert "q_proj" in capsys.readouterr().out
  # a PEFT adapter written by the interop helper, on the HF base
  adapter = save_peft(str(tmp_path / "adapter"), config, lora, params)
  out2 = str(tmp_path / "out2")
  assert main(["analyze", "--base", base_dir, "--finetuned", adapter, "--modules", "q_proj",
               "--no-plots", "--random-n", "0", "--quiet", "--out", out2]) == 0
  got2 = analysis.load_analysis(out2)
  assert {r["delta_from"] for r in got2.rows} == {"factors"}
  want2 = analysis.analyze(base, params, finetuned_lora=lora, modules="q_proj", progress=False)
  np.testing.assert_allclose(got2.spectra["q_proj.delta"], want2.spectra["q_proj.delta"], rtol=1e-5)
  assert sorted(os.listdir(out2)) == ["analysis.json", "spectra.npz"]
  # errors are reported, not raised
  assert main(["analyze", "--base", base_dir, "--finetuned", adapter, "--modules", "lm_head",
               "--quiet", "--out", out2]) == 2


def test_lora_jax_checkpoint(tiny, lora_model, tmp_path):
  from lora_jax.interop.native import save_checkpoint
  config, base = tiny
  lora, params = lora_model
  ckpt = save_checkpoint(str(tmp_path / "ckpt"), config, params, lora)
  res = analysis.analyze(base, ckpt, modules="q_proj", progress=False)
  want = analysis.analyze(base, params, finetuned_lora=lora, modules="q_proj", progress=False)
  assert {r["delta_from"] for r in res.rows} == {"factors"}  # LoRA scale read from the checkpoint
  np.testing.assert_allclose(res.spectra["q_proj.delta"], want.spectra["q_proj.delta"], rtol=1e-5)
