"""What launch/tpu.py and launch/gpu.py share: a shell that prints (--dry-run) or runs commands,
the remote install / start / poll scripts, the job (an explicit command or a config's sweep),
and the create -> setup -> start -> watch -> (recreate on preemption) -> delete loop.

A backend (TPU VM, queued resource, GCE GPU VM) only says how to create, describe, ssh, scp and
delete its machine; the loop is the same. Training resumes from its output_dir (checkpoints on
GCS), so after a preemption the same command is simply started again on a fresh machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_SRC = "~/lora-jax"  # the source tree on the machine; commands run from here
REMOTE_VENV = "~/lora-jax-venv"
REMOTE_JOB = "~/lora-jax-job"  # log and exit_code of the running job
STAGE_ROOT = "/tmp/lora-jax"  # models and data copied from GCS
SOURCE_ARCHIVE = "lora-jax-src.tar.gz"
LIBTPU_RELEASES = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"


# ------------------------------------------------------------------------------ shell
class Shell:
  """Prints each command as `$ ...`; runs it unless `dry_run`."""

  def __init__(self, dry_run: bool, out=None, sleep: Callable[[float], None] = time.sleep,
               tmpdir: str | None = None):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    self._sleep = sleep
    self.tmpdir = tmpdir or tempfile.gettempdir()  # local scripts and the source archive

  def note(self, text: str) -> None:
    print(f"# {text}", file=self.out, flush=True)

  def show(self, argv: Sequence[str]) -> None:
    print("$ " + shlex.join(argv), file=self.out, flush=True)

  def run(self, argv: Sequence[str], *, check: bool = True, retries: int = 0) -> int:
    self.show(argv)
    if self.dry_run:
      return 0
    for attempt in range(retries + 1):
      rc = subprocess.call(list(argv))
      if rc == 0:
        return 0
      if attempt < retries:
        self.note(f"exit code {rc}; retrying in 30 s ({attempt + 1}/{retries})")
        self._sleep(30)
    if check:
      raise RuntimeError(f"command failed with exit code {rc}: {shlex.join(argv)}")
    return rc

  def capture(self, argv: Sequence[str]) -> str | None:
    """stdout of the command, or None if it failed (or in a dry run)."""
    self.show(argv)
    if self.dry_run:
      return None
    p = subprocess.run(list(argv), capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else None

  def write(self, path: str, text: str) -> str:
    """Writes a local file (shown in full, prefixed by `#   `); returns its path."""
    self.note(f"file {path}:")
    for line in text.splitlines():
      print(f"#   {line}", file=self.out)
    if not self.dry_run:
      with open(path, "w") as f:
        f.write(text)
    return path

  def sleep(self, seconds: float) -> None:
    if not self.dry_run:
      self._sleep(seconds)


# ------------------------------------------------------------------------------ the job
@dataclasses.dataclass
class Job:
  """What runs on the machine: commands (argv lists) in order, from REMOTE_SRC."""
  commands: list[list[str]]
  names: list[str]
  env: dict[str, str]
  stage: list[tuple[str, str]]  # (gs:// source, local destination) copied before the job
  output_dirs: list[str] = dataclasses.field(default_factory=list)  # each run's output_dir


OUTPUT_DIR_FLAG = "--config.output_dir="


def output_dirs_of(commands: Sequence[Sequence[str]]) -> list[str]:
  """The `--config.output_dir=` of each command that names one."""
  return [a[len(OUTPUT_DIR_FLAG):] for c in commands for a in c if a.startswith(OUTPUT_DIR_FLAG)]


# The run inputs that training reads from local copies (eval.data_dir is read by `lora-jax eval`
# after training, and by training only with train.eval_every, which the paper configs leave 0).
STAGED_KEYS = ("model.hf_path", "data.path", "data.tokenizer")


def staged_inputs(runs, bucket: str) -> list[tuple[str, str]]:
  """(gs:// source, local destination) of every STAGE_ROOT/models/<name> and STAGE_ROOT/data/<name>
  directory in the runs' STAGED_KEYS (base model, tokenizer, dataset), from the same place under
  the bucket; models first."""
  pattern = re.compile(re.escape(STAGE_ROOT) + r"/(models|data)/([^/*?\[]+)")
  found = {m.groups() for r in runs for k in STAGED_KEYS
           for m in pattern.finditer(str(r.overrides.get(k, "")))}
  return [(f"{bucket}/{kind}/{name}", f"{STAGE_ROOT}/{kind}/{name}")
          for kind, name in sorted(found, key=lambda kn: (kn[0] != "models", kn[1]))]


def add_job_arguments(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("job: an explicit command after --, or a config's sweep")
  g.add_argument("--sweep", metavar="CONFIG", help="run this config's sweep (lora-jax sweep)")
  g.add_argument("--groups", default="", help="sweep groups (default: the config's default)")
  g.add_argument("--variant", action="append", default=None, metavar="K=V,...",
                 help="run exactly these variants of --sweep (repeatable)")
  g.add_argument("--set", action="append", default=[], dest="set_params", metavar="K=V,...",
                 help="variant keys for every sweep run (e.g. out=gs://b/runs)")
  g.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                 help="raw config override for every sweep run, e.g. train.microbatches=4")
  g.add_argument("--filter", default=None, metavar="REGEX", help="keep sweep runs matching")
  g.add_argument("--bucket", default="", metavar="gs://BUCKET",
                 help="sweep: write runs to BUCKET/runs and stage BUCKET/models/Llama-2-7b-hf and "
                      "the regime's dataset from BUCKET/data onto each machine")
  g.add_argument("--stage", action="append", default=[], metavar="GS_SRC=LOCAL_DST",
                 help="copy a GCS directory onto every machine before the job (repeatable)")
  g.add_argument("--env", action="append", default=[], metavar="K=V",
                 help="environment variable for the job (repeatable)")
  g.add_argument("command", nargs=argparse.REMAINDER,
                 help="-- lora-jax train|eval|analyze ... (run on every worker)")


def job_from_args(args: argparse.Namespace) -> Job:
  command = list(args.command or [])
  if command[:1] == ["--"]:
    command = command[1:]
  stage = [_split_pair(s, "--stage") for s in args.stage]
  env = dict(_split_pair(e, "--env") for e in args.env)
  if args.sweep and command:
    raise SystemExit("give either --sweep CONFIG or a command after --, not both")
  if not args.sweep:
    if args.bucket:
      raise SystemExit("--bucket applies to --sweep runs; with an explicit command, name gs:// "
                       "paths in it and use --stage for models and data")
    if not command:
      raise SystemExit("no job: give --sweep CONFIG or a command after -- (e.g. -- lora-jax "
                       "train --config configs/paper/code_ift.py)")
    return Job([command], [os.path.basename(command[0])], env, stage, output_dirs_of([command]))

  sys.path.insert(0, REPO_ROOT)
  # The launcher runs from a checkout with lora-jax installed.
  from lora_jax import config
  from lora_jax.experiments import sweep

  params = sweep.parse_params(args.set_params)
  bucket = args.bucket.rstrip("/")
  if bucket:
    params = {"out": f"{bucket}/runs", "model_root": f"{STAGE_ROOT}/models",
              "data_root": f"{STAGE_ROOT}/data", **params}
  groups = [g for g in args.groups.split(",") if g] or None
  runs = sweep.expand_sweep(args.sweep, groups, variants=args.variant, params=params,
                            match=args.filter, extra=args.override)
  if not runs:
    raise SystemExit("the sweep selection has no runs")
  if bucket:  # inputs are read from local copies; the run directories stay in the bucket
    stage = [*staged_inputs(runs, bucket), *stage]
  # The machine runs from its copy of the source tree: name the config relative to the repo.
  remote_config = os.path.relpath(os.path.abspath(args.sweep), REPO_ROOT)
  if remote_config.startswith(".."):
    raise SystemExit(f"--sweep {args.sweep}: the config must be inside the repository")
  commands = []
  for r in runs:
    argv = r.argv()
    argv[argv.index("--config") + 1] = remote_config
    commands.append(argv)
  return Job(commands, [r.name for r in runs], env, stage, [r.output_dir for r in runs])


def _split_pair(text: str, flag: str) -> tuple[str, str]:
  if "=" not in text:
    raise SystemExit(f"{flag} {text!r}: expected KEY=VALUE")
  a, b = text.split("=", 1)
  return a, b


# ------------------------------------------------------------------------------ remote scripts
def install_script(*, repo: str, ref: str, python: str, jax_extra: str,
                   stage: Sequence[tuple[str, str]]) -> str:
  """Bash for every machine: Python via uv, the source (git clone of `repo`, or the uploaded
  archive), `pip install -e` with jax[`jax_extra`], then the staged GCS directories."""
  venv_py = f"{REMOTE_VENV}/bin/python"
  lines = [
      "#!/usr/bin/env bash",
      "# lora-jax install (launch/cloud.py)",
      "set -euo pipefail",
      "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh",
      'export PATH="$HOME/.local/bin:$PATH"',
      f"uv venv --allow-existing --python {python} {REMOTE_VENV}",
      f"rm -rf {REMOTE_SRC}",
  ]
  if repo:
    lines += [f"git clone --quiet {shlex.quote(repo)} {REMOTE_SRC}",
              f"git -C {REMOTE_SRC} checkout --quiet {shlex.quote(ref)}"]
  else:
    lines += [f"mkdir -p {REMOTE_SRC}", f"tar -xzf ~/{SOURCE_ARCHIVE} -C {REMOTE_SRC}"]
  find_links = f" -f {LIBTPU_RELEASES}" if jax_extra == "tpu" else ""
  lines.append(f"uv pip install --python {venv_py} -e {REMOTE_SRC} "
               f"'jax[{jax_extra}]'{find_links}")
  for src, dst in stage:
    lines += [f"mkdir -p {shlex.quote(dst)}",
              f"gcloud storage rsync --recursive {shlex.quote(src)} {shlex.quote(dst)}"]
  lines.append(f"{REMOTE_VENV}/bin/lora-jax --help >/dev/null && echo lora-jax installed")
  return "\n".join(lines) + "\n"


def job_script(job: Job) -> str:
  """Bash that runs the job's commands in order from the source tree, stopping at the first
  failure, and writes the exit code to REMOTE_JOB/exit_code."""
  lines = ["#!/usr/bin/env bash", f"# lora-jax job: {len(job.commands)} command(s)",
           'export PATH="$HOME/lora-jax-venv/bin:$PATH"']
  lines += [f"export {k}={shlex.quote(v)}" for k, v in job.env.items()]
  lines += [f"cd {REMOTE_SRC}", "(", "  set -e"]
  for name, command in zip(job.names, job.commands):
    lines += [f"  echo '=== {name}'", "  " + shlex.join(command)]
  lines += [")", f"echo $? > {REMOTE_JOB}/exit_code"]
  return "\n".join(lines) + "\n"


INSTALL_FILE = "lora-jax-install.sh"
JOB_FILE = "lora-jax-job.sh"
RUN_INSTALL = f"bash ~/{INSTALL_FILE}"
# Detached, so the job survives the ssh session.
RUN_JOB = (f"mkdir -p {REMOTE_JOB} && rm -f {REMOTE_JOB}/exit_code && "
           f"(setsid nohup bash ~/{JOB_FILE} > {REMOTE_JOB}/log 2>&1 < /dev/null &)")
POLL_SCRIPT = f"cat {REMOTE_JOB}/exit_code 2>/dev/null || echo running"
TAIL_SCRIPT = f"tail -n +1 -F {REMOTE_JOB}/log"


def local_source_archive(sh: Shell) -> list[str]:
  """The committed tree (HEAD) as a tarball to upload when no --repo is given."""
  return ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz",
          f"--output={sh.tmpdir}/{SOURCE_ARCHIVE}", "HEAD"]


# ------------------------------------------------------------------------------ backends
class Backend:
  """How to drive one kind of machine. Methods return argv lists (nothing runs here)."""
  kind = "machine"
  jax_extra = "cpu"

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.name = args.name

  def create(self, sh: Shell) -> None:
    raise NotImplementedError

  def delete(self) -> list[str]:
    raise NotImplementedError

  def describe(self) -> list[str]:
    raise NotImplementedError

  def lost(self, state: str | None) -> bool:
    """True if the machine was preempted or is gone (a recreate is needed)."""
    raise NotImplementedError

  def ssh(self, script: str, worker: str = "all") -> list[str]:
    raise NotImplementedError

  def scp(self, local: str, remote: str) -> list[str]:
    raise NotImplementedError


MACHINE_ACTIONS = ("up", "create", "setup", "start", "logs", "status", "delete")
JOB_ACTIONS = ("up", "setup", "start")  # the actions that run the job


def machine_action_parsers(prog: str, doc: str):
  """A launcher's parser and its subparser per machine action, each with the common flags (and
  the job flags where the action runs the job): (parser, subparsers, {action: subparser})."""
  parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="action", required=True)
  actions = {}
  for action in MACHINE_ACTIONS:
    actions[action] = p = sub.add_parser(action)
    add_common_arguments(p)
    if action in JOB_ACTIONS:
      add_job_arguments(p)
  return parser, sub, actions


def add_common_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--name", required=True, help="machine (and queued resource) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default="", help="GCP project (default: gcloud's)")
  p.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
  p.add_argument("--repo", default="",
                 help="git URL to install lora-jax from (default: upload this checkout's HEAD)")
  p.add_argument("--ref", default="main", help="git ref with --repo")
  p.add_argument("--python", default="3.11", help="Python version for the remote venv (uv)")
  p.add_argument("--poll-seconds", type=float, default=120.0)
  p.add_argument("--max-restarts", type=int, default=50, help="recreations after preemption")
  p.add_argument("--keep", action="store_true", help="do not delete the machine at the end")
  p.add_argument("--no-stream", action="store_true", help="do not stream worker 0's log")


def project_flags(args: argparse.Namespace) -> list[str]:
  return [f"--project={args.project}"] if args.project else []


def setup(backend: Backend, sh: Shell, job: Job) -> None:
  """Uploads the source (unless --repo) and the install script, and runs it everywhere."""
  args = backend.args
  if not args.repo:
    sh.run(backend.scp(f"{sh.tmpdir}/{SOURCE_ARCHIVE}", SOURCE_ARCHIVE), retries=3)
  script = install_script(repo=args.repo, ref=args.ref, python=args.python,
                          jax_extra=backend.jax_extra, stage=job.stage)
  local = sh.write(f"{sh.tmpdir}/{backend.name}-{INSTALL_FILE}", script)
  sh.run(backend.scp(local, INSTALL_FILE), retries=3)
  sh.run(backend.ssh(RUN_INSTALL), retries=2)


def note_output_dirs(sh: Shell, job: Job) -> None:
  """Names each run directory; one on the machine's own disk is lost with the machine."""
  for d in job.output_dirs:
    where = "in the bucket" if d.startswith("gs://") else (
        "ON THE MACHINE'S DISK: lost on preemption, the run cannot resume; use gs://")
    sh.note(f"run directory {d} ({where})")


def start(backend: Backend, sh: Shell, job: Job) -> None:
  """Uploads the job script and starts it, detached, on every worker."""
  note_output_dirs(sh, job)
  local = sh.write(f"{sh.tmpdir}/{backend.name}-{JOB_FILE}", job_script(job))
  sh.run(backend.scp(local, JOB_FILE), retries=3)
  sh.run(backend.ssh(RUN_JOB))


def watch(backend: Backend, sh: Shell, stream: bool) -> int | None:
  """Polls until the job ends (its exit code) or the machine is lost (None)."""
  sh.note(f"every {backend.args.poll_seconds:g} s: is the {backend.kind} still up, is the job "
          "done? (recreate and restart on preemption)")
  tail = None
  if stream:
    argv = backend.ssh(TAIL_SCRIPT, worker="0")
    sh.show(argv)
    if not sh.dry_run:
      tail = subprocess.Popen(argv)
  try:
    while True:
      sh.sleep(backend.args.poll_seconds)
      state = sh.capture(backend.describe())
      if sh.dry_run:
        sh.capture(backend.ssh(POLL_SCRIPT, worker="0"))
        return 0
      if backend.lost(state):
        sh.note(f"{backend.kind} {backend.name} lost (state {state!r})")
        return None
      out = sh.capture(backend.ssh(POLL_SCRIPT, worker="0"))
      if out and out.splitlines()[-1].strip().isdigit():
        return int(out.splitlines()[-1].strip())
  finally:
    if tail is not None:
      tail.terminate()


def up(backend: Backend, sh: Shell, job: Job) -> int:
  """create -> setup -> start -> watch. When the machine is lost (preemption) or cannot be
  created or set up (e.g. no Spot capacity), delete it and start over: the job resumes from its
  output_dir. The machine is deleted at the end unless --keep."""
  args = backend.args
  if not args.repo:
    sh.note("uploading this checkout's HEAD (commit your changes first)")
    sh.run(local_source_archive(sh))
  restarts = 0
  rc = 1
  try:
    while True:
      try:
        backend.create(sh)
        setup(backend, sh, job)
        start(backend, sh, job)
        result = watch(backend, sh, stream=not args.no_stream)
      except RuntimeError as e:  # a gcloud command failed
        sh.note(str(e))
        result = None
      if result is not None:
        rc = result
        sh.note(f"job finished with exit code {rc}")
        break
      restarts += 1
      if restarts > args.max_restarts:
        sh.note(f"giving up after {args.max_restarts} restarts")
        break
      sh.note(f"restart {restarts}: recreating the {backend.kind}; training resumes from its "
              "output_dir")
      sh.run(backend.delete(), check=False)
      sh.sleep(60)
  except KeyboardInterrupt:
    sh.note(f"interrupted: the {backend.kind} is left running; delete it with: "
            f"{shlex.join(backend.delete())}")
    return 130
  if args.keep:
    sh.note(f"--keep: {backend.kind} {backend.name} left running")
  else:
    sh.run(backend.delete(), check=False)
  return rc


def logs(backend: Backend, sh: Shell) -> int:
  return sh.run(backend.ssh(TAIL_SCRIPT, worker="0"), check=False)


def status(backend: Backend, sh: Shell) -> int:
  state = sh.capture(backend.describe())
  print(state if state is not None else "(unknown)")
  done = sh.capture(backend.ssh(POLL_SCRIPT, worker="0"))
  print(f"job: {done if done is not None else '(unknown)'}")
  return 0


def dispatch(action: str, backend: Backend, sh: Shell, args: argparse.Namespace) -> int:
  """Runs one launcher action (up / create / setup / start / logs / status / delete)."""
  if action == "up":
    return up(backend, sh, job_from_args(args))
  if action == "create":
    backend.create(sh)
    return 0
  if action == "setup":
    if not args.repo:
      sh.run(local_source_archive(sh))
    setup(backend, sh, job_from_args(args))
    return 0
  if action == "start":
    start(backend, sh, job_from_args(args))
    return 0
  if action == "logs":
    return logs(backend, sh)
  if action == "status":
    return status(backend, sh)
  return sh.run(backend.delete(), check=False)
