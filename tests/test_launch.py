"""launch/: the printed gcloud / docker / hf commands of every script's --dry-run, the generated
remote scripts, and the create -> run -> preempted -> recreate -> delete loop with a fake gcloud."""

import importlib.util
import io
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")


def load(name):
  path = os.path.join(LAUNCH, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_launch_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tpu, gpu, prepare = load("tpu"), load("gpu"), load("prepare_data")
cloud = sys.modules["cloud"]  # launch/cloud.py, as the scripts import it


@pytest.fixture(autouse=True)
def no_subprocesses(monkeypatch):
  """A dry run must not run anything (tests that fake gcloud patch these again)."""
  def boom(*a, **k):
    raise AssertionError(f"ran a command in a dry run: {a}")
  for name in ("call", "run", "Popen"):
    monkeypatch.setattr(cloud.subprocess, name, boom)


def dry(main, argv, capsys):
  argv = list(argv)
  argv.insert(argv.index("--") if "--" in argv else len(argv), "--dry-run")  # before the job
  assert main(argv) == 0
  out = capsys.readouterr().out
  return out, [l[2:] for l in out.splitlines() if l.startswith("$ ")]


TRAIN = ["--", "lora-jax", "train", "--config", "configs/paper/code_ift.py",
         "--config.output_dir=gs://b/runs/x"]


def test_tpu_up_dry_run_creates_installs_runs_and_deletes(capsys):
  out, cmds = dry(tpu.main, ["up", "--name", "lj", "--zone", "us-east5-a",
                             "--accelerator-type", "v5p-64", "--spot", "--preflight=off", *TRAIN],
                  capsys)
  create = next(c for c in cmds if "tpu-vm create" in c)
  for flag in ("lj", "--zone=us-east5-a", "--accelerator-type=v5p-64",
               "--version=v2-alpha-tpuv5", "--spot"):
    assert flag in create
  ssh = [c for c in cmds if "tpu-vm ssh" in c and "--worker=all" in c]
  assert len(ssh) == 2  # install, start
  assert all("--worker=all" in c for c in cmds if "tpu-vm scp" in c)
  assert ("lora-jax train --config configs/paper/code_ift.py "
          "--config.output_dir=gs://b/runs/x") in out  # in the job script, shown in full
  assert "git" in cmds[0] and "archive" in cmds[0]  # this checkout's HEAD is uploaded
  assert cmds[-1].startswith("gcloud compute tpus tpu-vm delete lj --zone=us-east5-a")
  assert cmds.index(create) < cmds.index(ssh[0]) < cmds.index(ssh[1]) < len(cmds) - 1


def test_tpu_flags_preemptible_project_and_runtime_versions(capsys):
  _, cmds = dry(tpu.main, ["create", "--name", "a", "--zone", "us-central2-b", "--project", "p1",
                           "--accelerator-type", "v4-32", "--preemptible"], capsys)
  assert cmds == ["gcloud compute tpus tpu-vm create a --zone=us-central2-b --project=p1 "
                  "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --preemptible"]
  assert tpu.runtime_version("v5litepod-16") == "v2-alpha-tpuv5-lite"
  assert tpu.runtime_version("v6e-8") == "v2-alpha-tpuv6e"
  with pytest.raises(SystemExit, match="unknown TPU family"):
    tpu.runtime_version("v9x-8")
  _, cmds = dry(tpu.main, ["create", "--name", "a", "--zone", "z", "--accelerator-type",
                           "v5litepod-16", "--version", "custom-rt"], capsys)
  assert "--version=custom-rt" in cmds[0] and "--spot" not in cmds[0]


def test_tpu_queued_resource(capsys):
  out, cmds = dry(tpu.main, ["up", "--name", "q", "--zone", "us-east5-a", "--queued", "--spot",
                             "--accelerator-type", "v5p-128", "--preflight=off", *TRAIN], capsys)
  create = next(c for c in cmds if "queued-resources create" in c)
  assert "--node-id=q" in create and "--runtime-version=v2-alpha-tpuv5" in create
  assert "--spot" in create and "--accelerator-type=v5p-128" in create
  assert any("queued-resources describe q" in c for c in cmds)
  assert cmds[-1] == ("gcloud compute tpus queued-resources delete q --zone=us-east5-a "
                      "--force --quiet")
  with pytest.raises(SystemExit):
    tpu.main(["create", "--name", "q", "--zone", "z", "--queued", "--preemptible", "--dry-run"])


def test_tpu_sweep_with_bucket_stages_and_writes_to_gcs(capsys):
  config = os.path.join(ROOT, "configs", "paper", "code_ift.py")  # absolute on this machine
  out, cmds = dry(tpu.main, ["up", "--name", "s", "--zone", "z", "--bucket", "gs://B",
                             "--preflight=off",
                             "--sweep", config, "--groups", "main", "--filter", "ep4$",
                             "--override", "train.microbatches=2"], capsys)
  trains = [l for l in out.splitlines() if l.lstrip("# ").startswith("lora-jax train")]
  assert len(trains) == 4  # full + LoRA r16/64/256 at 4 epochs
  assert all("--config configs/paper/code_ift.py" in t for t in trains)  # repo-relative
  assert all("--config.train.microbatches=2" in t for t in trains)
  assert "--config.output_dir=gs://B/runs/code_ift/code_ift-lora-r256-lr1e-4-ep4" in out
  assert "--config.model.hf_path=/tmp/lora-jax/models/Llama-2-7b-hf" in out
  assert ("gcloud storage rsync --recursive gs://B/data/magicoder-evol-instruct-110k "
          "/tmp/lora-jax/data/magicoder-evol-instruct-110k") in out
  assert "gs://B/models/Llama-2-7b-hf /tmp/lora-jax/models/Llama-2-7b-hf" in out
  with pytest.raises(SystemExit, match="either --sweep"):
    tpu.main(["up", "--name", "s", "--zone", "z", "--sweep", config, "--dry-run", *TRAIN])
  with pytest.raises(SystemExit, match="--bucket applies to --sweep"):
    tpu.main(["up", "--name", "s", "--zone", "z", "--bucket", "gs://B", "--dry-run", *TRAIN])
  with pytest.raises(SystemExit, match="no job"):
    tpu.main(["up", "--name", "s", "--zone", "z", "--dry-run"])


def test_tpu_sweep_dry_run_names_every_run_directory_in_the_bucket(capsys):
  """Preemptible VMs: each run directory is in the bucket (so a fresh VM resumes it); the VM's
  disk holds only staged inputs (base model, tokenizer, dataset), copied from the bucket."""
  config = os.path.join(ROOT, "configs", "paper", "math_ift.py")
  out, _ = dry(tpu.main, ["up", "--name", "s", "--zone", "z", "--bucket", "gs://B/",
                          "--preflight=off", "--sweep", config, "--groups", "main"], capsys)
  run_dirs = [l.split()[3] for l in out.splitlines() if l.startswith("# run directory ")]
  output_dirs = [a.split("=", 1)[1].strip("'") for l in out.splitlines() for a in l.split()
                 if a.startswith("--config.output_dir=")]
  assert run_dirs and sorted(run_dirs) == sorted(output_dirs)
  assert all(d.startswith("gs://B/runs/math_ift/") for d in run_dirs)
  assert "ON THE MACHINE'S DISK" not in out
  staged = sorted(l.split()[-1] for l in out.splitlines() if "gcloud storage rsync" in l)
  inputs = {a.split("=", 1)[1] for l in out.splitlines() for a in l.replace("'", "").split()
            if a.startswith(("--config.model.hf_path=", "--config.data.path=",
                             "--config.data.tokenizer="))}
  assert len(inputs) == 3  # one base model, one dataset glob, one tokenizer for the sweep
  assert all(any(i.startswith(d + "/") or i == d for d in staged) for i in inputs), (inputs, staged)
  # an explicit command writing to the machine's own disk is called out
  out, _ = dry(tpu.main, ["up", "--name", "s", "--zone", "z", "--preflight=off", "--", "lora-jax",
                          "train",
                          "--config", "configs/paper/math_ift.py",
                          "--config.output_dir=/tmp/runs/x"], capsys)
  assert "run directory /tmp/runs/x (ON THE MACHINE'S DISK" in out


def test_tpu_from_git_repo_and_env(capsys):
  out, cmds = dry(tpu.main, ["setup", "--name", "g", "--zone", "z", "--repo",
                             "https://github.com/o/lora-jax.git", "--ref", "v1", *TRAIN], capsys)
  assert "git clone --quiet https://github.com/o/lora-jax.git ~/lora-jax" in out
  assert "checkout --quiet v1" in out
  assert not any("archive" in c for c in cmds)  # nothing uploaded but the install script
  assert "'jax[tpu]'" in out
  out, _ = dry(tpu.main, ["start", "--name", "g", "--zone", "z", "--env", "XLA_FLAGS=--x=1",
                          *TRAIN], capsys)
  assert "export XLA_FLAGS=--x=1" in out


def test_generated_scripts_are_valid_bash(tmp_path):
  job = cloud.Job([["lora-jax", "train", "--config", "c.py", "--config.data.path=d/*.jsonl"],
                   ["lora-jax", "eval", "--model", "m", "--out", "o"]], ["a", "b"],
                  {"K": "v w"}, [("gs://b/m", "/tmp/m")])
  scripts = {"job.sh": cloud.job_script(job),
             "install.sh": cloud.install_script(repo="", ref="main", python="3.11",
                                                jax_extra="tpu", stage=job.stage)}
  for name, text in scripts.items():
    (tmp_path / name).write_text(text)
    assert os.system(f"bash -n {tmp_path / name}") == 0, name  # syntax check only
  text = scripts["job.sh"]
  assert "  set -e" in text and "echo $? > ~/lora-jax-job/exit_code" in text
  assert text.index("echo '=== a'") < text.index("lora-jax eval")
  assert "'--config.data.path=d/*.jsonl'" in text  # quoted: no glob expansion on the machine


def tpu_args(*extra):
  parser = tpu.build_parser()
  return parser.parse_args(["up", "--name", "lj", "--zone", "z", "--spot", "--poll-seconds", "1",
                            *extra, *TRAIN])


class FakeGcloud:
  """describe says PREEMPTED once, then READY; the job is 'running' once, then exits `rc`."""

  def __init__(self, rc=0):
    self.calls, self.states, self.polls, self.rc = [], ["PREEMPTED", "READY"], ["running"], rc

  def call(self, argv):
    self.calls.append(argv)
    return 0

  def run(self, argv, capture_output=True, text=True):
    self.calls.append(argv)
    if "describe" in argv:
      out = self.states.pop(0) if self.states else "READY"
    else:
      out = self.polls.pop(0) if self.polls else str(self.rc)
    return subprocess.CompletedProcess(argv, 0, stdout=out + "\n", stderr="")


@pytest.mark.parametrize("rc", [0, 3])
def test_up_recreates_after_preemption_then_deletes(monkeypatch, tmp_path, rc):
  fake = FakeGcloud(rc)
  c = cloud
  monkeypatch.setattr(c.subprocess, "call", fake.call)
  monkeypatch.setattr(c.subprocess, "run", fake.run)
  args = tpu_args("--no-stream")
  sh = c.Shell(dry_run=False, out=io.StringIO(), sleep=lambda s: None, tmpdir=str(tmp_path))
  job = c.job_from_args(args)
  assert c.up(tpu.Tpu(args), sh, job) == rc
  verbs = [" ".join(a[3:5]) if a[0] == "gcloud" else a[0] for a in fake.calls]
  creates = [i for i, v in enumerate(verbs) if v == "tpu-vm create"]
  deletes = [i for i, v in enumerate(verbs) if v == "tpu-vm delete"]
  assert len(creates) == 2  # first slice preempted, second one finishes the job
  assert len(deletes) == 2 and deletes[0] < creates[1] and deletes[-1] == len(verbs) - 1
  assert (tmp_path / "lj-lora-jax-job.sh").read_text().count("lora-jax train") == 1
  assert f"exit code {rc}" in sh.out.getvalue()


def test_up_keep_leaves_the_machine(monkeypatch, tmp_path):
  fake = FakeGcloud()
  fake.states = ["READY"]
  c = cloud
  monkeypatch.setattr(c.subprocess, "call", fake.call)
  monkeypatch.setattr(c.subprocess, "run", fake.run)
  args = tpu_args("--no-stream", "--keep")
  sh = c.Shell(dry_run=False, out=io.StringIO(), sleep=lambda s: None, tmpdir=str(tmp_path))
  assert c.up(tpu.Tpu(args), sh, c.job_from_args(args)) == 0
  assert not any("delete" in a for a in fake.calls)


def test_gpu_vm_dry_run(capsys):
  out, cmds = dry(gpu.main, ["up", "--name", "g", "--zone", "us-central1-a", "--spot",
                             "--machine-type", "a2-ultragpu-8g", *TRAIN], capsys)
  create = next(c for c in cmds if "instances create" in c)
  for flag in ("--zone=us-central1-a", "--machine-type=a2-ultragpu-8g",
               "--provisioning-model=SPOT", "--maintenance-policy=TERMINATE",
               "--image-project=deeplearning-platform-release"):
    assert flag in create
  assert "'jax[cuda12]'" in out and "libtpu" not in out
  assert any(c.startswith("gcloud compute ssh g") for c in cmds)
  assert "lora-jax train --config configs/paper/code_ift.py" in out
  assert cmds[-1] == "gcloud compute instances delete g --zone=us-central1-a --quiet"
  _, cmds = dry(gpu.main, ["create", "--name", "g", "--zone", "z", "--machine-type",
                           "n1-standard-16", "--accelerator", "type=nvidia-tesla-v100,count=4"],
                capsys)
  assert "--accelerator=type=nvidia-tesla-v100,count=4" in cmds[0]
  assert "SPOT" not in cmds[0]


def test_gpu_local_docker(capsys):
  _, cmds = dry(gpu.main, ["local", "--mount", "/data:/data", "--env", "A=1", *TRAIN], capsys)
  assert len(cmds) == 1
  assert cmds[0].startswith("docker run --rm --gpus all")
  assert "-v /data:/data" in cmds[0] and "-e A=1" in cmds[0]
  assert "ghcr.io/nvidia/jax:jax" in cmds[0]
  assert "pip install -q -e . && lora-jax train --config configs/paper/code_ift.py" in cmds[0]


def test_prepare_data_dry_run(capsys):
  out, cmds = dry(prepare.main, ["--out", "/d", "--regimes", "code_ift,math_ift", "--bucket",
                                 "gs://B"], capsys)
  assert cmds[0].startswith("hf download meta-llama/Llama-2-7b-hf")
  assert "tokenizer.model" in cmds[0]
  assert any("ise-uiuc/Magicoder-Evol-Instruct-110K --repo-type dataset" in c for c in cmds)
  assert any("MetaMathQA-395K.jsonl" in c for c in cmds)  # JSON array -> JSON lines
  assert not any("starcoderdata" in c for c in cmds)
  assert cmds[-1] == "gcloud storage rsync --recursive /d/data gs://B/data"
  with pytest.raises(SystemExit):
    prepare.main(["--out", "/d", "--regimes", "code_rlhf", "--dry-run"])


def test_prepare_data_layout_matches_the_configs():
  from lora_jax import config
  for regime, (_, sub, *_rest) in prepare.DATASETS.items():
    module = config.load_module(os.path.join(ROOT, "configs", "paper", f"{regime}.py"))
    assert f"data/{module.DATA['path'].split('/')[0]}" == sub
    assert module.DATA["hf_dataset"].split(":")[0] == prepare.DATASETS[regime][0]
