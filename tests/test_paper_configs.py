"""configs/paper/*: every run of every sweep loads and validates; the paper's values are encoded."""

import json
import math
import os

import pytest

from lora_jax import config
from lora_jax.config import PRESETS
from lora_jax.experiments import sweep

PAPER = os.path.join(os.path.dirname(__file__), "..", "configs", "paper")
REGIMES = ("code_cpt", "math_cpt", "code_ift", "math_ift")


def path_of(regime):
  return os.path.join(PAPER, f"{regime}.py")


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
  """A stand-in for the Llama-2-7b-hf directory (validation only checks config.json)."""
  root = tmp_path_factory.mktemp("models")
  hf = root / "Llama-2-7b-hf"
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps(PRESETS["llama2_7b"].to_hf()))
  return str(root)


@pytest.fixture(scope="module")
def modules():
  return {r: config.load_module(path_of(r)) for r in REGIMES}


@pytest.mark.parametrize("regime", REGIMES)
def test_default_variant_loads_as_the_train_cli_does(regime, model_root):
  cfg = config.load_config(path_of(regime), [f"model.hf_path={model_root}/Llama-2-7b-hf"])
  config.validate_config(cfg)
  config.validate_config(cfg, num_devices=32)  # e.g. a v5p-64 slice: 32 chips, FSDP
  assert cfg.model.preset == "llama2_7b"
  assert cfg.model.dtype == "bfloat16" and cfg.model.param_dtype == "float32"
  assert cfg.mesh.fsdp == -1 and cfg.mesh.data == 1


@pytest.mark.parametrize("regime", REGIMES)
def test_every_sweep_run_validates(regime, modules, model_root):
  groups = list(sweep.sweep_groups(modules[regime]))
  runs = sweep.expand_sweep(path_of(regime), groups, params={"model_root": model_root})
  assert len(runs) >= 20
  sweep.validate_runs(runs, num_devices=32)  # e.g. v5p-64: 32 chips
  sweep.validate_runs(runs[:3], num_devices=64)  # v5p-128 also divides the batch
  too_many = 512 if regime == "math_ift" else 128  # 768 / 192 rows do not split that many ways
  with pytest.raises(config.ConfigError, match="train.global_batch"):
    sweep.validate_runs(runs[:1], num_devices=too_many)


def test_shared_optimizer_lora_and_dtype_values(modules):
  for regime, m in modules.items():
    for variant in ("rank=16", "rank=64", "rank=256", "method=full"):
      c = m.get_config(variant)
      assert (c.optimizer.name, c.optimizer.b1, c.optimizer.b2) == ("lionw", 0.9, 0.95), regime
      # Appendix A: weight decay 1e-6 for code CPT only (Composer decoupled)
      assert c.optimizer.weight_decay == (1e-6 if regime == "code_cpt" else 0.0), regime
      assert c.optimizer.grad_clip == 1.0
      assert c.model.attention_dropout == 0.0
      if variant == "method=full":
        assert not c.lora.enabled
        continue
      assert c.lora.enabled and c.lora.alpha == 2 * c.lora.rank  # alpha = 2r
      assert c.lora.dropout == 0.05 and c.lora.targets == "all" and not c.lora.use_rslora
    assert m.get_config("targets=attention").lora.targets == "attention"
    assert m.get_config("targets=mlp").lora.targets == "mlp"


@pytest.mark.parametrize("regime,full,lora16,lora64,lora256", [
    ("code_cpt", 1e-5, 1e-5, 1e-5, 1e-5),
    ("math_cpt", 1e-5, 4e-5, 4e-5, 4e-5),
    ("code_ift", 5e-5, 2e-4, 2e-4, 1e-4),
    ("math_ift", 1e-5, 1e-4, 1e-4, 5e-5),
])
def test_learning_rates_follow_the_paper_table(modules, regime, full, lora16, lora64, lora256):
  m = modules[regime]
  assert m.get_config("method=full").optimizer.lr == full
  assert m.get_config("rank=16").optimizer.lr == lora16
  assert m.get_config("rank=64").optimizer.lr == lora64
  assert m.get_config("rank=256").optimizer.lr == lora256
  assert m.get_config("rank=256,lr=3e-4").optimizer.lr == 3e-4  # explicit lr wins


def test_batch_and_sequence_length(modules):
  for regime in ("code_cpt", "math_cpt", "code_ift"):
    c = modules[regime].get_config()
    assert (c.train.global_batch, c.train.seq_len) == (192, 4096), regime
  c = modules["math_ift"].get_config()
  assert (c.train.global_batch, c.train.seq_len) == (768, 1024)


def test_cpt_schedule_budget_and_checkpoints(modules):
  for regime in ("code_cpt", "math_cpt"):
    m = modules[regime]
    c = m.get_config()
    assert c.data.regime == "cpt" and c.data.pack
    # LLM-Foundry inv_sqrt_with_warmup as the paper ran it: t_warmup = t_scale = 1000 batches,
    # alpha_f_decay = 1, a cooldown over the last 20% (5086 batches at 20B), alpha_f_cooldown 0
    s = c.schedule
    assert s.name == "inv_sqrt_with_warmup"
    assert (s.warmup_steps, s.warmup_fraction, s.inv_sqrt_scale_steps) == (1000, 0.0, 1000)
    assert (s.alpha_f_decay, s.alpha_f_cooldown, s.cooldown_fraction) == (1.0, 0.0, 0.2)
    assert c.train.token_budget == 20_000_000_000 and not c.train.epochs
    budgets = m.common.CPT_BUDGETS
    assert budgets == (0.25e9, 0.5e9, 1e9, 2e9, 4e9, 8e9, 16e9, 20e9)  # no 10B
    steps = m.common.checkpoint_steps(m.common.regime(vars(m)))
    # the trunk keeps the step at or before 0.8 T of each smaller budget
    assert steps == [math.floor(0.8 * t / (192 * 4096)) for t in budgets[:-1]]
    assert steps == [254, 508, 1017, 2034, 4069, 8138, 16276]
    assert c.train.keep_steps == ",".join(str(s) for s in steps)
    branch = m.get_config("tokens=4e9")
    assert branch.train.token_budget == 4_000_000_000 and branch.train.keep_steps == ""
    assert m.branch_of("tokens=4e9") == ("", 4069) and m.branch_of("") is None
    assert m.branch_of("method=full,tokens=1e9") == ("method=full", 1017)
    with pytest.raises(ValueError, match="beyond"):
      m.get_config("tokens=25e9")


def test_ift_schedule_and_epochs(modules):
  for regime in ("code_ift", "math_ift"):
    m = modules[regime]
    c = m.get_config("epochs=4")
    # packed as LLM-Foundry's packing_ratio (the authors' 193 steps per Magicoder epoch)
    assert c.data.regime == "ift" and c.data.pack and c.data.packing_ratio == 3.0
    assert c.schedule.name == "cosine_with_warmup"
    assert c.schedule.warmup_fraction == 0.1 and c.schedule.alpha_f == 0.01
    assert c.train.epochs == 4.0 and not c.train.token_budget
    assert m.EPOCHS == (1, 2, 4, 8, 16)
    assert c.train.keep_steps == ""  # IFT: one run per epoch count, exported at the end
    unpacked = m.get_config("pack=false")
    assert not unpacked.data.pack and unpacked.data.packing_ratio == 0.0
    assert m.run_name("pack=false").endswith("-unpacked")


def test_data_sources_and_tokenizer(modules):
  expected = {"code_cpt": ("parquet", "content", "bigcode/starcoderdata"),
              "math_cpt": ("parquet", "text", "open-web-math/open-web-math"),
              "code_ift": ("jsonl", "text", "ise-uiuc/Magicoder-Evol-Instruct-110K"),
              "math_ift": ("jsonl", "text", "meta-math/MetaMathQA")}
  for regime, (source, field, hf) in expected.items():
    m = modules[regime]
    c = m.get_config("data_root=gs://bucket/data,model_root=/mnt/models")
    assert c.data.source == source and c.data.text_field == field
    assert m.DATA["hf_dataset"].startswith(hf)
    assert c.data.path.startswith("gs://bucket/data/")
    assert c.model.hf_path == "/mnt/models/Llama-2-7b-hf"
    # Appendix A: the base tokenizer for CPT, the chat model's for IFT (local directories)
    tok_dir = "Llama-2-7b-hf" if m.KIND == "cpt" else "Llama-2-7b-chat-hf"
    assert c.data.tokenizer == f"/mnt/models/{tok_dir}/tokenizer.model"
  assert modules["code_ift"].get_config().data.format == "magicoder"
  assert modules["math_ift"].get_config().data.format == "metamath"


def test_eval_settings(modules):
  """Each regime names its eval tasks; the paper's settings are what `lora-jax eval` uses."""
  from lora_jax.evals import runner
  for regime in ("code_cpt", "code_ift"):
    assert modules[regime].get_config().eval.tasks == "humaneval,forgetting"
  for regime in ("math_cpt", "math_ift"):
    assert modules[regime].get_config().eval.tasks == "gsm8k,forgetting"
  options = runner.EvalOptions()
  assert (options.humaneval_samples, options.humaneval_temperature, options.humaneval_top_p) == (
      50, 0.2, 0.95)
  shots = {t: runner.num_fewshot(t, options) for t in runner.expand_tasks("gsm8k,forgetting")}
  assert shots == {"gsm8k": 5, "hellaswag": 0, "arc_challenge": 3, "winogrande": 5,
                   "forgetting": 0}


def test_bad_variants_name_the_key(modules):
  m = modules["code_ift"]
  with pytest.raises(ValueError, match="rnak"):
    m.get_config("rnak=16")
  with pytest.raises(ValueError, match="rank"):
    m.get_config("rank=sixteen")
  with pytest.raises(ValueError, match="method"):
    m.get_config("method=qlora")
  with pytest.raises(ValueError, match="targets"):
    m.get_config("targets=embeddings")
  with pytest.raises(ValueError, match="epochs"):
    m.get_config("tokens=1e9")  # IFT length is in epochs
  with pytest.raises(ValueError, match="tokens"):
    modules["code_cpt"].get_config("epochs=2")  # CPT length is in tokens


def test_run_names_are_readable_and_distinct(modules):
  m = modules["code_ift"]
  assert m.run_name("rank=256,epochs=4") == "code_ift-lora-r256-lr1e-4-ep4"
  assert m.run_name("method=full,wd=1e-4,epochs=2") == "code_ift-full-lr5e-5-wd1e-4-ep2"
  assert m.get_config("rank=64,epochs=8,out=gs://b/runs").output_dir == (
      "gs://b/runs/code_ift/code_ift-lora-r64-lr2e-4-ep8")
  assert modules["code_cpt"].run_name("method=full") == "code_cpt-full-lr1e-5-20B"
  assert modules["math_cpt"].run_name("tokens=2.5e8") == "math_cpt-lora-r16-lr4e-5-250M"


# The paper's settings per regime, as `lora-jax sweep --dry-run` lists them (Appendix A, the
# authors' table; paper_protocol.md). CPT: steps = ceil(T / (192 x 4096)); cooldown = 20% of T.
CPT_STEPS = {0.25e9: 318, 0.5e9: 636, 1e9: 1272, 2e9: 2544, 4e9: 5087, 8e9: 10173,
             16e9: 20346, 20e9: 25432}
PAPER_LR = {"code_cpt": (1e-5, 1e-5, 1e-5, 1e-5), "math_cpt": (1e-5, 4e-5, 4e-5, 4e-5),
            "code_ift": (5e-5, 2e-4, 2e-4, 1e-4), "math_ift": (1e-5, 1e-4, 1e-4, 5e-5)}


@pytest.mark.parametrize("regime", REGIMES)
def test_dry_run_lists_the_papers_runs(regime, capsys):
  from lora_jax import cli
  assert cli.main(["sweep", "--config", path_of(regime), "--dry-run", "--json"]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  names = [r["name"] for r in rows]
  for row in rows:
    plan, name = row["plan"], row["name"]
    method = 0 if "-full-" in name else {"r16": 1, "r64": 2, "r256": 3}[name.split("-")[2]]
    assert plan["lr"] == PAPER_LR[regime][method], name
    assert plan["weight_decay"] == (1e-6 if regime == "code_cpt" else 0.0), name
    if regime.endswith("cpt"):
      steps = CPT_STEPS[plan["tokens"]]
      assert plan["steps"] == steps and plan["batch"] == "192x4096", name
      assert plan["schedule"] == {"name": "inv_sqrt_with_warmup", "t_warmup": 1000,
                                  "t_scale": 1000, "t_cooldown": round(0.2 * steps),
                                  "alpha_f_decay": 1.0, "alpha_f_cooldown": 0.0}, name
      # Fig. 6: the spectral analysis of every full-FT budget's cooled-down model
      analyze = [f for f in row["follow_ups"] if f[1] == "analyze"]
      if "-full-" in name:
        assert analyze == [["lora-jax", "analyze", "--base", "models/Llama-2-7b-hf",
                            "--finetuned", f"{row['output_dir']}/export/hf", "--out",
                            f"{row['output_dir']}/analysis", "--quiet"]], name
      else:
        assert analyze == [], name
      if plan["tokens"] < 20e9:  # a cooldown branch, started after its trunk from 0.8 T
        trunk = row["start_from"].split("/checkpoints/")[0].rsplit("/", 1)[1]
        assert names.index(trunk) < names.index(name) and trunk.endswith("-20B")
        assert int(row["start_from"].rsplit("/", 1)[1]) == plan["start_step"] == math.floor(
            0.8 * plan["tokens"] / (192 * 4096)) <= steps - round(0.2 * steps)
      else:
        assert row["start_from"] is None
    else:
      per_epoch = 193 if regime == "code_ift" else 171  # authors' table / project choice
      assert plan["steps_per_epoch"] == per_epoch and plan["packing_ratio"] == 3.0
      assert plan["steps"] == per_epoch * plan["epochs"]
      assert plan["batch"] == ("192x4096" if regime == "code_ift" else "768x1024")
      assert plan["schedule"] == {"name": "cosine_with_warmup", "warmup_fraction": 0.1,
                                  "alpha_f": 0.01}
  budgets = sorted({r["plan"].get("tokens") or r["plan"]["epochs"] for r in rows})
  assert budgets == (sorted(CPT_STEPS) if regime.endswith("cpt") else [1, 2, 4, 8, 16])
  assert len(rows) == (32 if regime.endswith("cpt") else 20)
  if regime == "code_ift":
    assert [r["plan"]["steps"] for r in rows if "-full-" in r["name"]][-1] == 3088  # 16 epochs


def test_lr_sensitivity_sweep_is_its_own_group(modules):
  # Appendix B / Fig. S1: all modules but gate_proj, alpha = 32, over an LR grid
  m = modules["code_ift"]
  variants = m.get_sweep()["lr_s1"]
  loras = [m.get_config(v) for v in variants if "method=full" not in v]
  assert loras and all(c.lora.alpha == 32.0 for c in loras)
  assert all(c.lora.targets == "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj" for c in loras)
  assert {c.optimizer.lr for c in loras} == set(m.LR_GRID["lora"])
  assert all(c.train.epochs == 2.0 for c in loras)
  assert "-a32-no_gate-" in m.run_name(variants[-1])
