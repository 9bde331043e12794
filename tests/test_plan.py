"""`lora-jax plan`: slice names, the analytic model's candidates, and ahead-of-time compiles of
the tiny preset for a v5e:2x2 slice (libtpu, the `tpu` extra; no TPU needed) and for the CPU."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from lora_jax import config as rc
from lora_jax.plan import topologies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libtpu") is None,
    reason="libtpu not installed (pip install -e '.[tpu]')")


def test_slice_names_resolve_to_topologies_and_chips():
  s = topologies.resolve("v5e-8")
  assert (s.topology, s.num_chips, s.chip.family) == ("v5e:2x4", 8, "v5e")
  assert topologies.resolve("v5litepod-16").topology == "v5e:4x4"
  assert topologies.resolve("v5p-8").num_chips == 4  # v5p names count TensorCores
  assert topologies.resolve("v6e:2x2").chip.hbm_bytes == 32 * 1024**3
  with pytest.raises(ValueError, match="unknown TPU slice 'v9-8'"):
    topologies.resolve("v9-8")
  sizes = [s.num_chips for s in topologies.standard_slices()]
  assert sizes == sorted(sizes)
  for chip in topologies.CHIPS.values():
    assert chip.source.startswith("cloud.google.com/tpu/docs/")


def test_every_candidate_is_a_valid_run_config():
  from lora_jax.config import preset
  from lora_jax.plan import memory_model as mm
  cands = mm.candidates(8, preset("llama2_7b"), 16)
  assert {c.remat for c in cands} == set(mm.REMAT)
  assert {c.mesh for c in cands} >= {(8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)}
  for c in cands[:: max(1, len(cands) // 12)]:
    cfg = rc.load_config(os.path.join(ROOT, "configs", "paper", "code_cpt.py"),
                         c.overrides() + ["--config.train.global_batch=16",
                                          "--config.model.hf_path="])
    rc.validate_config(cfg, num_devices=8)
    assert cfg.train.microbatches == c.microbatches


def test_estimate_scales_the_loop_body_by_microbatches_and_adds_splash_attention():
  from types import SimpleNamespace

  from lora_jax.config import preset
  from lora_jax.plan import compile as pc
  from lora_jax.plan import memory_model as mm
  from lora_jax.plan import report, search
  mc = preset("llama2_7b")
  shapes = mm.Shapes(model_config=mc, lora_config=None, shapes=None, axes=None, labels=None,
                     optimizer="lionw", n_total=int(6.74e9), n_matmul=int(6.61e9),
                     n_trainable=int(6.74e9), n_layer=0, scores=False)
  chip = topologies.CHIPS["v5p"]
  tgt = search.Target("v5p-8", [None] * 4, 4, chip.hbm_bytes, chip.peak_bf16_flops,
                      chip.hbm_bytes_per_s, chip.ici_bytes_per_s, chip.source)
  cfg = SimpleNamespace(train=SimpleNamespace(global_batch=192, seq_len=4096))
  body = pc.Compiled("train", 0, 0, 0, 0, 0, flops=1e14, bytes_accessed=1e11,
                     compile_seconds=0.0, splash_kernels=[])
  one = report._estimate(body, tgt, cfg, shapes, mm.Candidate("none", 1, (1, 4, 1)))
  many = report._estimate(body, tgt, cfg, shapes, mm.Candidate("none", 24, (1, 4, 1)))
  assert many["flops_per_device"] == 24 * one["flops_per_device"] == 24e14
  assert many["step_seconds"] == pytest.approx(24e14 / chip.peak_bf16_flops)
  splash = dataclasses.replace(body, splash_kernels=["splash_mha_fwd"])
  with_attention = report._estimate(splash, tgt, cfg, shapes, mm.Candidate("none", 1, (1, 4, 1)))
  attention = 192 * 4096 * mm.attention_flops_per_token(shapes, 4096) / 4
  assert with_attention["flops_per_device"] == pytest.approx(1e14 + attention)
  assert with_attention["label"].startswith("ESTIMATE")


def _plan(tmp_path, config, topology, *overrides, programs="train"):
  out = tmp_path / "plan.json"
  env = dict(os.environ, PYTHONPATH=ROOT, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  p = subprocess.run([sys.executable, "-m", "lora_jax.cli", "plan", "--config",
                      os.path.join(ROOT, "configs", config), "--topology", topology,
                      "--programs", programs, "--json", str(out),
                      "--config.model.dtype=bfloat16", *overrides],
                     capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
  assert p.returncode == 0, p.stdout + p.stderr[-3000:]
  return json.loads(out.read_text()), p.stdout


@needs_libtpu
@pytest.mark.slow
def test_plan_full_ft_for_v5e_matches_the_parameter_count_and_6NT(tmp_path):
  r, text = _plan(tmp_path, "tiny_full.py", "v5e:2x2", "--config.mesh.data=1",
                  "--config.mesh.fsdp=-1", programs="train,prefill,decode")
  assert r["fits"] and "FITS: yes" in text and "ESTIMATE" in text
  n, devices = r["params"]["total"], r["target"]["devices"]
  assert devices == 4 and r["params"]["trainable"] == n
  pd = r["per_device"]
  f32 = 4 * n
  # Sharded over fsdp=4 except the replicated norm scales: between a quarter and all of it.
  assert f32 / devices <= pd["trainable_bytes"] <= f32 / devices * 1.1
  assert pd["frozen_base_bytes"] == 0
  assert pd["trainable_bytes"] <= pd["optimizer_bytes"] <= pd["trainable_bytes"] + 64  # lion
  train = r["programs"]["train"]
  assert train["argument_bytes"] >= pd["trainable_bytes"] + pd["optimizer_bytes"]
  assert pd["total_bytes"] == train["total_bytes"] <= pd["hbm_bytes"]
  tokens = r["train"]["global_batch"] * r["train"]["seq_len"] / devices
  assert abs(train["flops"] / (6 * n * tokens) - 1) < 0.10
  assert {"prefill", "decode"} <= set(r["programs"])
  e = r["estimate"]
  assert e["label"].startswith("ESTIMATE") and 0 < e["mfu"] < 1 and e["step_seconds"] > 0
  assert e["peak_bf16_flops_per_device"] == topologies.CHIPS["v5e"].peak_bf16_flops


@needs_libtpu
@pytest.mark.slow
def test_plan_lora_for_v5e_keeps_the_base_frozen_small_and_uses_splash(tmp_path):
  r, _ = _plan(tmp_path, "tiny_lora.py", "v5e:2x2", "--config.lora.dropout=0.0",
               "--config.train.seq_len=256", programs="train,eval")
  n, trainable = r["params"]["total"], r["params"]["trainable"]
  pd = r["per_device"]
  assert r["fits"] and 0 < trainable < n / 4
  frozen = 4 * (n - trainable)
  assert frozen / 4 <= pd["frozen_base_bytes"] <= frozen  # data=-1: replicated or sharded
  assert pd["trainable_bytes"] <= 4 * trainable
  assert "eval" in r["programs"] and r["programs"]["eval"]["flops"] > 0
  # The TPU program's attention is the Pallas splash kernel (forward and both backward parts).
  kernels = r["programs"]["train"]["splash_kernels"]
  assert any("fwd" in k for k in kernels) and any("dkv" in k for k in kernels), kernels


@pytest.mark.slow
def test_plan_auto_for_cpu_prints_the_overrides(tmp_path):
  r, text = _plan(tmp_path, "tiny_lora.py", "cpu", "--auto")
  assert r["fits"] and r["auto"] and r["estimate"] is None  # no published CPU peak
  assert "use: --config.model.remat=" in text
  cfg = rc.load_config(os.path.join(ROOT, "configs", "tiny_lora.py"),
                       r["setting"]["overrides"])
  rc.validate_config(cfg, num_devices=r["target"]["devices"])


def test_plan_without_libtpu_says_how_to_get_it(monkeypatch, capsys):
  import builtins

  from lora_jax.cli import main
  real_import = builtins.__import__

  def no_libtpu(name, *a, **k):
    if name == "libtpu":
      raise ImportError(name)
    return real_import(name, *a, **k)
  monkeypatch.setattr(builtins, "__import__", no_libtpu)
  assert main(["plan", "--config", os.path.join(ROOT, "configs", "tiny_lora.py"),
               "--topology", "v5e-8"]) == 2
  assert "pip install -e '.[tpu]'" in capsys.readouterr().err


def test_plan_rejects_an_unknown_slice(capsys):
  from lora_jax.cli import main
  assert main(["plan", "--config", os.path.join(ROOT, "configs", "tiny_lora.py"),
               "--topology", "v5e-7"]) == 2
  assert "unknown TPU slice 'v5e-7'" in capsys.readouterr().err
