#!/usr/bin/env python3
"""Cloud TPU: create a TPU VM (or a queued resource), install lora-jax on every worker, run
`lora-jax train|eval|analyze` (or a config's whole sweep) on all workers, stream worker 0's log,
recreate the slice and restart after a preemption (training resumes from its output_dir on GCS),
and delete the slice at the end. Every subcommand takes --dry-run (print the gcloud commands).

  python launch/tpu.py up --name lora-code-ift --zone us-east5-a --accelerator-type v5p-64 \\
      --spot --bucket gs://MY_BUCKET --sweep configs/paper/code_ift.py --groups main
  python launch/tpu.py up --name t1 --zone us-central2-b --accelerator-type v4-32 --queued \\
      -- lora-jax train --config configs/paper/math_ift.py --config.output_dir=gs://B/runs/x
  python launch/tpu.py logs|status|delete --name t1 --zone us-central2-b

Subcommands: up (everything), create, setup, start, logs, status, delete.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cloud  # noqa: E402  (launch/cloud.py, next to this file)

# TPU software versions for JAX, from the Cloud TPU docs ("TPU software versions").
RUNTIME_VERSIONS = {
    "v6e": "v2-alpha-tpuv6e",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v4": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v2": "tpu-ubuntu2204-base",
}
# Queued-resource states that mean the slice is gone and must be recreated.
QR_LOST = ("SUSPENDING", "SUSPENDED", "FAILED", "DELETING")
NODE_LOST = ("PREEMPTED", "TERMINATED", "STOPPED", "STOPPING", "DELETING")


def runtime_version(accelerator_type: str) -> str:
  family = accelerator_type.split("-")[0]
  if family not in RUNTIME_VERSIONS:
    raise SystemExit(f"--accelerator-type {accelerator_type}: unknown TPU family {family!r}; "
                     f"pass --version (known: {sorted(RUNTIME_VERSIONS)})")
  return RUNTIME_VERSIONS[family]


class Tpu(cloud.Backend):
  """A TPU VM slice, created directly (tpu-vm create) or through a queued resource."""
  kind = "TPU"
  jax_extra = "tpu"

  def __init__(self, args):
    super().__init__(args)
    self.version = args.version or runtime_version(args.accelerator_type)
    if args.queued and args.preemptible:
      raise SystemExit("--preemptible is not available for queued resources; use --spot")
    self.where = [f"--zone={args.zone}", *cloud.project_flags(args)]

  def create(self, sh):
    a = self.args
    if a.queued:
      argv = ["gcloud", "compute", "tpus", "queued-resources", "create", self.name,
              f"--node-id={self.name}", *self.where, f"--accelerator-type={a.accelerator_type}",
              f"--runtime-version={self.version}"]
      argv += ["--spot"] if a.spot else []
      sh.run(argv)
      sh.note("waiting for the queued resource to become ACTIVE")
      while True:
        state = sh.capture(["gcloud", "compute", "tpus", "queued-resources", "describe",
                            self.name, *self.where, "--format=value(state.state)"])
        if sh.dry_run or state == "ACTIVE":
          return
        if state in ("FAILED", "SUSPENDED"):
          raise RuntimeError(f"queued resource {self.name} is {state}")
        sh.sleep(60)
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "create", self.name, *self.where,
            f"--accelerator-type={a.accelerator_type}", f"--version={self.version}"]
    argv += ["--spot"] if a.spot else []
    argv += ["--preemptible"] if a.preemptible else []
    sh.run(argv)

  def delete(self):
    if self.args.queued:
      return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.name, *self.where,
              "--force", "--quiet"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.name, *self.where, "--quiet"]

  def describe(self):
    if self.args.queued:
      return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.name,
              *self.where, "--format=value(state.state)"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.name, *self.where,
            "--format=value(state)"]

  def lost(self, state):
    return state is None or state in (QR_LOST if self.args.queued else NODE_LOST)

  def ssh(self, script, worker="all"):
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self.where,
            f"--worker={worker}", f"--command={script}"]

  def scp(self, local, remote):
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{self.name}:{remote}",
            *self.where, "--worker=all"]


def build_parser() -> argparse.ArgumentParser:
  parser, _, actions = cloud.machine_action_parsers("launch/tpu.py", __doc__)
  for action, p in actions.items():
    p.add_argument("--accelerator-type", default="v5p-64",
                   help="e.g. v5p-64 (32 chips), v4-32, v5litepod-16, v6e-16")
    p.add_argument("--version", default="", help="TPU software version (default: by family)")
    p.add_argument("--spot", action="store_true", help="Spot capacity (preemptible, cheaper)")
    p.add_argument("--preemptible", action="store_true", help="legacy preemptible TPU VM")
    p.add_argument("--queued", action="store_true",
                   help="request through a queued resource (waits for capacity)")
    if action == "up":
      p.add_argument("--preflight", choices=("compile", "analytic", "off"), default="compile",
                     help="before creating the slice, plan every training run for it "
                          "(lora-jax plan) and refuse runs that do not fit (default: compile)")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  sh = cloud.Shell(dry_run=args.dry_run)
  if args.action == "up" and args.preflight != "off" and not preflight(args, sh):
    return 2
  return cloud.dispatch(args.action, Tpu(args), sh, args)


def preflight(args, sh) -> bool:
  """Every training run of the job planned for --accelerator-type before a slice is created."""
  job = cloud.job_from_args(args)  # (puts the repository on sys.path)
  from lora_jax.plan import preflight as pf
  return pf.check(job.commands, job.names, args.accelerator_type, mode=args.preflight,
                  repo_root=cloud.REPO_ROOT, note=sh.note)


if __name__ == "__main__":
  sys.exit(main())
