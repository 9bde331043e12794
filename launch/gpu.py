#!/usr/bin/env python3
"""Single-host GPU: a Compute Engine VM with GPUs (default a3-highgpu-8g, 8x H100 80GB) driven
like launch/tpu.py (create, install lora-jax with jax[cuda12], run, stream the log, recreate
after a Spot preemption, delete), or `local`: the same job in NVIDIA's JAX container on this
machine's GPUs. Every subcommand takes --dry-run (print the commands, run nothing).

  python launch/gpu.py up --name lora-gpu --zone us-central1-a --spot \\
      --bucket gs://MY_BUCKET --sweep configs/paper/math_ift.py --variant rank=256,epochs=4
  python launch/gpu.py local --dry-run -- lora-jax train --config configs/paper/code_ift.py
  python launch/gpu.py logs|status|delete --name lora-gpu --zone us-central1-a

Subcommands: up, create, setup, start, logs, status, delete, local.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cloud  # noqa: E402  (launch/cloud.py, next to this file)

DEFAULT_IMAGE = "ghcr.io/nvidia/jax:jax"  # NVIDIA JAX Toolbox, latest nightly of jax
# Deep Learning VM image with the NVIDIA driver; list others with `gcloud compute images list
# --project deeplearning-platform-release --filter="family~common-cu"`.
DEFAULT_IMAGE_FAMILY = "common-cu128-ubuntu-2204-nvidia-570"
LOST = ("TERMINATED", "STOPPING", "STOPPED", "SUSPENDING", "SUSPENDED")


class GceGpu(cloud.Backend):
  """One Compute Engine VM with GPUs attached."""
  kind = "GPU VM"
  jax_extra = "cuda12"

  def __init__(self, args):
    super().__init__(args)
    self.where = [f"--zone={args.zone}", *cloud.project_flags(args)]

  def create(self, sh):
    a = self.args
    argv = ["gcloud", "compute", "instances", "create", self.name, *self.where,
            f"--machine-type={a.machine_type}", f"--image-family={a.image_family}",
            "--image-project=deeplearning-platform-release", f"--boot-disk-size={a.disk_gb}GB",
            "--maintenance-policy=TERMINATE", "--scopes=cloud-platform",
            "--metadata=install-nvidia-driver=True"]
    if a.accelerator:  # a2/a3/g2 machine types come with their GPUs; n1 needs --accelerator
      argv.append(f"--accelerator={a.accelerator}")
    if a.spot:
      argv += ["--provisioning-model=SPOT", "--instance-termination-action=DELETE"]
    sh.run(argv)

  def delete(self):
    return ["gcloud", "compute", "instances", "delete", self.name, *self.where, "--quiet"]

  def describe(self):
    return ["gcloud", "compute", "instances", "describe", self.name, *self.where,
            "--format=value(status)"]

  def lost(self, state):
    return state is None or state in LOST

  def ssh(self, script, worker="all"):
    del worker  # one host
    return ["gcloud", "compute", "ssh", self.name, *self.where, f"--command={script}"]

  def scp(self, local, remote):
    return ["gcloud", "compute", "scp", local, f"{self.name}:{remote}", *self.where]


def docker_argv(args, job: cloud.Job) -> list[str]:
  """`docker run` of the job in a JAX GPU container, with this checkout mounted."""
  workdir = "/workspace/lora-jax"
  inner = ["pip install -q -e .", *(shlex.join(c) for c in job.commands)]
  argv = ["docker", "run", "--rm", "--gpus", "all", "--ipc=host", "--shm-size=16g",
          "-v", f"{cloud.REPO_ROOT}:{workdir}", "-w", workdir]
  for mount in args.mount:
    argv += ["-v", mount]
  for k, v in job.env.items():
    argv += ["-e", f"{k}={v}"]
  argv += [args.image, "bash", "-c", " && ".join(inner)]
  return argv


def build_parser() -> argparse.ArgumentParser:
  parser, sub, actions = cloud.machine_action_parsers("launch/gpu.py", __doc__)
  for p in actions.values():
    p.add_argument("--machine-type", default="a3-highgpu-8g",
                   help="a3-highgpu-8g (8x H100 80GB), a2-ultragpu-8g (8x A100 80GB), ...")
    p.add_argument("--accelerator", default="", help="e.g. type=nvidia-l4,count=1 (n1/g2)")
    p.add_argument("--image-family", default=DEFAULT_IMAGE_FAMILY)
    p.add_argument("--disk-gb", type=int, default=1000, help="boot disk (model, data, cache)")
    p.add_argument("--spot", action="store_true", help="Spot VM (preemptible, cheaper)")
  p = sub.add_parser("local", help="run the job here in a JAX GPU container (docker)")
  p.add_argument("--dry-run", action="store_true")
  p.add_argument("--image", default=DEFAULT_IMAGE)
  p.add_argument("--mount", action="append", default=[], metavar="HOST:CONTAINER",
                 help="extra volume, e.g. /data/models:/workspace/lora-jax/models")
  cloud.add_job_arguments(p)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  sh = cloud.Shell(dry_run=args.dry_run)
  if args.action == "local":
    return sh.run(docker_argv(args, cloud.job_from_args(args)), check=False)
  return cloud.dispatch(args.action, GceGpu(args), sh, args)


if __name__ == "__main__":
  sys.exit(main())
