"""lora_jax.experiments.sweep and `lora-jax sweep`: expansion counts, overrides that reproduce
each variant, deduplication, filtering, the dry-run listing and sequential execution."""

import json
import os
import textwrap

import pytest

from lora_jax import cli, config, fileio
from lora_jax.experiments import sweep

PAPER = os.path.join(os.path.dirname(__file__), "..", "configs", "paper")


def paper(name):
  return os.path.join(PAPER, f"{name}.py")


@pytest.mark.parametrize("regime,group,count", [
    ("code_ift", "main", 20),            # (full + LoRA r16/64/256) x 5 epoch counts
    ("code_ift", "targets", 20),         # LoRA r16/256 x attention/mlp x 5 epoch counts
    ("code_ift", "regularization", 20),  # full FT x (wd 5e-5, 1e-4, adrop 0.05, 0.1) x 5
    ("code_ift", "lr", 12),              # full x 4 LRs + LoRA r16/256 x 4 LRs, at 2 epochs
    ("math_ift", "main", 20),
    ("code_cpt", "main", 32),            # per method: the 20B trunk + 7 cooldown branches
    ("math_cpt", "targets", 32),
    ("math_cpt", "lr", 12),
])
def test_expansion_counts(regime, group, count):
  runs = sweep.expand_sweep(paper(regime), [group])
  assert len(runs) == count
  assert len({r.name for r in runs}) == count
  assert len({r.output_dir for r in runs}) == count
  assert all(r.group == group for r in runs)


def test_default_group_is_main_and_groups_concatenate():
  assert len(sweep.expand_sweep(paper("code_ift"))) == 20
  assert len(sweep.expand_sweep(paper("code_ift"), ["main", "regularization"])) == 40
  with pytest.raises(ValueError, match="no sweep group 'nope'"):
    sweep.expand_sweep(paper("code_ift"), ["nope"])


def test_overrides_reproduce_each_variant():
  module = config.load_module(paper("code_ift"))
  runs = sweep.expand_sweep(paper("code_ift"), ["main", "regularization", "lr"])
  for run in runs[::7]:
    overrides = [f"{k}={sweep.format_value(v)}" for k, v in run.overrides.items()]
    loaded = config.load_config(run.config_path, overrides)
    assert config.flatten(loaded) == config.flatten(module.get_config(run.variant))


def test_paper_values_in_the_commands():
  runs = {r.name: r for r in sweep.expand_sweep(paper("code_ift"), ["main", "regularization"])}
  lora256 = runs["code_ift-lora-r256-lr1e-4-ep4"].overrides
  assert lora256["lora.rank"] == 256 and lora256["lora.alpha"] == 512.0
  assert lora256["optimizer.lr"] == 1e-4 and lora256["train.epochs"] == 4.0
  full = runs["code_ift-full-lr5e-5-ep16"].overrides
  assert full["lora.enabled"] is False and full["optimizer.lr"] == 5e-5
  assert runs["code_ift-full-lr5e-5-wd1e-4-ep8"].overrides["optimizer.weight_decay"] == 1e-4
  adrop = runs["code_ift-full-lr5e-5-adrop0.05-ep1"].argv()
  assert "--config.model.attention_dropout=0.05" in adrop
  assert adrop[:4] == ["lora-jax", "train", "--config", paper("code_ift")]


def test_set_params_apply_to_every_run_and_collapse_duplicates():
  runs = sweep.expand_sweep(paper("code_ift"), ["main"],
                            params={"epochs": "4", "out": "gs://b/runs", "data_root": "gs://b/d"})
  assert [r.name for r in runs] == ["code_ift-full-lr5e-5-ep4", "code_ift-lora-r16-lr2e-4-ep4",
                                    "code_ift-lora-r64-lr2e-4-ep4", "code_ift-lora-r256-lr1e-4-ep4"]
  for r in runs:
    assert r.output_dir == f"gs://b/runs/code_ift/{r.name}"
    assert r.overrides["data.path"].startswith("gs://b/d/")


def test_explicit_variants_and_filter():
  runs = sweep.expand_sweep(paper("math_ift"), variants=["rank=256,epochs=2", "method=full"])
  assert [r.name for r in runs] == ["math_ift-lora-r256-lr5e-5-ep2", "math_ift-full-lr1e-5-ep16"]
  assert runs[0].overrides["optimizer.lr"] == 5e-5
  only = sweep.expand_sweep(paper("code_ift"), ["main"], match=r"r256.*ep(1|16)$")
  assert [r.name for r in only] == ["code_ift-lora-r256-lr1e-4-ep1",
                                    "code_ift-lora-r256-lr1e-4-ep16"]


def test_default_run_still_names_its_output_dir():
  runs = sweep.expand_sweep(paper("code_cpt"), variants=[""])
  assert runs[0].overrides == {"output_dir": "runs/code_cpt/code_cpt-lora-r16-lr1e-5-20B"}
  assert runs[0].command().endswith(
      "--config.output_dir=runs/code_cpt/code_cpt-lora-r16-lr1e-5-20B")


def test_format_value_round_trips_through_apply_override():
  cfg = config.default_config()
  for key, value in [("optimizer.lr", 2e-05), ("lora.enabled", False), ("train.token_budget",
                     20_000_000_000), ("data.path", "gs://b/x/*.parquet"), ("train.epochs", 4.0)]:
    config.apply_override(cfg, key, sweep.format_value(value))
    assert config.flatten(cfg)[key] == value


TINY = textwrap.dedent("""
    from lora_jax.config import default_config

    def get_config(arg=None):
      c = default_config()
      params = dict(kv.split("=") for kv in (arg or "").split(",") if kv)
      c.lora.rank = int(params.get("rank", 16))
      c.optimizer.lr = float(params.get("lr", 1e-3))
      c.train.steps = 2
      c.output_dir = "runs/tiny-" + params.get("name", "r%d" % c.lora.rank)
      return c

    def run_name(arg=None):
      params = dict(kv.split("=") for kv in (arg or "").split(",") if kv)
      return "tiny-" + params.get("name", "r" + params.get("rank", "16"))

    def get_sweep():
      return {"main": ["rank=4", "rank=8", "rank=4"], "clash": ["rank=4,name=x", "rank=8,name=x"]}
    """)


@pytest.fixture
def tiny_config(tmp_path):
  path = tmp_path / "tiny_sweep.py"
  path.write_text(TINY)
  return str(path)


def test_identical_variants_collapse_and_name_clashes_fail(tiny_config):
  runs = sweep.expand_sweep(tiny_config)
  assert [(r.name, r.variant) for r in runs] == [("tiny-r4", "rank=4"), ("tiny-r8", "rank=8")]
  with pytest.raises(ValueError, match="share the run name 'tiny-x'"):
    sweep.expand_sweep(tiny_config, ["clash"])


def test_files_without_run_name_are_named_by_variant(tmp_path):
  path = tmp_path / "plain.py"
  path.write_text(TINY.replace("def run_name(", "def _unused_run_name("))
  runs = sweep.expand_sweep(str(path))
  assert [r.name for r in runs] == ["plain-rank-4", "plain-rank-8"]


def test_sweep_files_load_like_train_configs(tmp_path):
  """One loader: an error inside a sweep file names file:line, as for `lora-jax train`."""
  path = tmp_path / "broken.py"
  path.write_text(TINY.replace("c.train.steps = 2", "c.train.steps = undefined_name"))
  with pytest.raises(config.ConfigError) as e:
    sweep.expand_sweep(str(path))
  line = TINY.splitlines().index("  c.train.steps = 2") + 1
  assert e.value.key == "config" and f"broken.py:{line}: NameError" in str(e.value)


def test_cli_dry_run_lists_commands(capsys):
  assert cli.main(["sweep", "--config", paper("code_ift"), "--dry-run",
                   "--groups", "main,regularization"]) == 0
  out = capsys.readouterr().out
  commands = [l for l in out.splitlines() if l.startswith("lora-jax train")]
  assert len(commands) == 40
  assert all(f"--config {paper('code_ift')}" in c for c in commands)
  assert sum("--config.optimizer.weight_decay=0.0001" in c for c in commands) == 5


def test_cli_json_list_groups_and_errors(capsys):
  assert cli.main(["sweep", "--config", paper("math_cpt"), "--dry-run", "--json"]) == 0
  rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert len(rows) == 32 and rows[0]["argv"][:2] == ["lora-jax", "train"]
  assert rows[0]["output_dir"] == "runs/math_cpt/math_cpt-full-lr1e-5-20B"
  assert rows[0]["start_from"] is None and rows[0]["plan"]["steps"] == 25432
  assert rows[1]["start_from"] == "runs/math_cpt/math_cpt-full-lr1e-5-20B/checkpoints/254"
  assert cli.main(["sweep", "--config", paper("code_ift"), "--list-groups"]) == 0
  assert "regularization: 20 variants" in capsys.readouterr().out
  assert cli.main(["sweep", "--config", paper("code_ift"), "--dry-run", "--groups", "nope"]) == 2
  assert cli.main(["sweep", "--config", "configs/paper/missing.py", "--dry-run"]) == 2
  assert cli.main(["sweep", "--config", paper("code_ift"), "--dry-run",
                   "--variant", "rnak=4"]) == 2
  assert "rnak" in capsys.readouterr().err


def test_run_sequentially_stops_or_keeps_going(tiny_config):
  runs = sweep.expand_sweep(tiny_config)
  calls = []

  def call(argv):
    calls.append(argv)
    return 1 if "--config.lora.rank=4" in argv else 0

  assert sweep.run_sequentially(runs, call=call, log=lambda s: None) == 1
  assert len(calls) == 1  # stopped at the first failure
  assert calls[0][1:4] == ["-m", "lora_jax.cli", "train"]
  calls.clear()
  assert sweep.run_sequentially(runs, call=call, keep_going=True, log=lambda s: None) == 1
  assert len(calls) == 2
  assert sweep.run_sequentially(runs, call=lambda a: 0, log=lambda s: None) == 0


def test_cli_without_dry_run_runs_each(tiny_config, monkeypatch, capsys):
  seen = []
  monkeypatch.setattr(sweep.subprocess, "call", lambda argv: seen.append(argv) or 0)
  assert cli.main(["sweep", "--config", tiny_config]) == 0
  assert [a[a.index("--config") + 1] for a in seen] == [tiny_config, tiny_config]
  assert ["--config.lora.rank=4" in a for a in seen] == [True, False]
  assert "launch/tpu.py" in capsys.readouterr().err  # CPU-only here: the hint is printed


def test_commands_parse_in_the_train_cli(tmp_path, capsys):
  """The printed commands are accepted by `lora-jax train` as they are (via --print-config)."""
  from lora_jax.config import PRESETS
  hf = tmp_path / "Llama-2-7b-hf"
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps(PRESETS["llama2_7b"].to_hf()))
  runs = sweep.expand_sweep(paper("code_ift"), variants=["rank=256,epochs=4,wd=1e-4"],
                            params={"model_root": str(tmp_path)},
                            extra=["train.microbatches=4"])
  argv = runs[0].argv()
  assert argv[:2] == ["lora-jax", "train"]
  assert cli.main(argv[1:] + ["--print-config"]) == 0
  printed = capsys.readouterr().out
  for line in ("rank: 256", "alpha: 512.0", "lr: 0.0001", "weight_decay: 0.0001",
               "microbatches: 4", "epochs: 4.0"):
    assert line in printed


def test_branch_seeded_from_the_trunk_resumes_to_the_trunks_result(tmp_path):
  """A cooldown branch = the trunk's checkpoint + the rest of the run: a branch of the same
  length as its trunk ends bitwise where the trunk does, and resumes from step 3, not 0."""
  import jax
  import numpy as np
  from _train_support import StandInData, tiny_cfg
  from lora_jax.train import train
  trunk = train(tiny_cfg(tmp_path / "trunk", steps=5, keep_steps="3", keep_checkpoints=1),
                data_iter=StandInData(8, 32))
  run = sweep.PlannedRun("branch", {"output_dir": str(tmp_path / "branch")},
                         start_from=str(tmp_path / "trunk" / "checkpoints" / "3"), after="trunk")
  assert sweep.seed_from_trunk(run)
  assert not sweep.seed_from_trunk(run)  # it has a checkpoint now: a restart resumes it
  branch = train(tiny_cfg(tmp_path / "branch", steps=5), data_iter=StandInData(8, 32))
  assert [m["step"] for m in branch.metrics if "loss" in m] == [4, 5]
  for a, b in zip(jax.tree.leaves(trunk.params), jax.tree.leaves(branch.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  missing = sweep.PlannedRun("b2", {"output_dir": str(tmp_path / "b2")}, after="trunk",
                             start_from=str(tmp_path / "trunk" / "checkpoints" / "2"))
  with pytest.raises(FileNotFoundError, match="run trunk first"):
    sweep.seed_from_trunk(missing)


def test_run_sequentially_skips_finished_runs_and_orphaned_branches(tmp_path):
  done = sweep.PlannedRun("done", {"output_dir": str(tmp_path / "done")})
  os.makedirs(tmp_path / "done" / "export" / "hf")
  trunk = sweep.PlannedRun("trunk", {"output_dir": str(tmp_path / "trunk")})
  branch = sweep.PlannedRun("branch", {"output_dir": str(tmp_path / "branch")}, after="trunk",
                            start_from=str(tmp_path / "trunk" / "checkpoints" / "1"))
  calls, logs = [], []
  rc = sweep.run_sequentially([done, trunk, branch], call=lambda argv: calls.append(argv) or 3,
                              keep_going=True, log=logs.append)
  assert rc == 1 and len(calls) == 1  # only the trunk ran (and failed); the branch waits
  assert "done: finished, skipped" in logs[0] and "its trunk trunk failed" in logs[-2]


def test_follow_ups_run_after_training_until_their_output_exists(tmp_path):
  analysis = tmp_path / "r" / "analysis" / "analysis.json"
  follow = sweep.FollowUp(("analyze", "--out", str(analysis.parent)), str(analysis))
  run = sweep.PlannedRun("r", {"output_dir": str(tmp_path / "r")}, follow_ups=(follow,))
  calls = []
  assert sweep.run_sequentially([run], call=lambda argv: calls.append(argv) or 0,
                                log=lambda s: None) == 0
  assert calls[0][1:3] == ["-m", "lora_jax.cli"] and calls[0][3] == "train"
  assert calls[1][3:] == ["analyze", "--out", str(analysis.parent)]
  os.makedirs(tmp_path / "r" / "export" / "hf")  # finished: training is skipped, not analysis
  calls.clear()
  sweep.run_sequentially([run], call=lambda argv: calls.append(argv) or 0, log=lambda s: None)
  assert [c[3] for c in calls] == ["analyze"]
  os.makedirs(analysis.parent)
  analysis.write_text("{}")
  calls.clear()
  sweep.run_sequentially([run], call=lambda argv: calls.append(argv) or 0, log=lambda s: None)
  assert calls == []


def test_seeding_on_an_object_store_copies_the_commit_marker_last(gcs_url, monkeypatch):
  """No rename on GCS (the emulator here): objects are copied one by one, orbax's commit marker
  last, so a copy cut short is not a checkpoint (and is redone on the next start)."""
  src = fileio.join(gcs_url, "trunk", "checkpoints", "4")
  for rel in ("commit_success.txt", "state/a.bin", "state/manifest.ocdbt", "data.json"):
    fileio.atomic_write_text(fileio.join(src, rel), rel)
  run = sweep.PlannedRun("b", {"output_dir": fileio.join(gcs_url, "b")}, start_from=src)
  copied = []
  real_copy = fileio._copy_object

  def fail_at_marker(fs, a, b):
    if a.endswith("commit_success.txt"):
      raise OSError("connection reset")
    copied.append(a.rsplit("/", 1)[-1])
    return real_copy(fs, a, b)

  monkeypatch.setattr(fileio, "_copy_object", fail_at_marker)
  with pytest.raises(OSError):
    sweep.seed_from_trunk(run)
  assert sorted(copied) == ["a.bin", "data.json", "manifest.ocdbt"]  # everything but the marker
  assert not sweep._has_checkpoints(run.output_dir)  # the cut-short copy is no checkpoint
  monkeypatch.setattr(fileio, "_copy_object", real_copy)
  assert sweep.seed_from_trunk(run)
  dest = fileio.join(gcs_url, "b", "checkpoints", "4")
  assert fileio.read_text(fileio.join(dest, "state", "a.bin")) == "state/a.bin"
  assert fileio.exists(fileio.join(dest, "commit_success.txt"))
  assert sweep._has_checkpoints(run.output_dir)
  assert not sweep.seed_from_trunk(run)  # it has a checkpoint now: it resumes instead
