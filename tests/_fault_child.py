"""`lora-jax` (lora_jax.cli.main) with one injected SIGKILL, for tests/test_faults.py.

  python tests/_fault_child.py train --config ... [--config.key=value ...]

LORA_JAX_TEST_KILL="<where>:<step>" picks the moment the process SIGKILLs itself:
  step:N    before optimizer step N runs (steps since the last checkpoint are lost)
  save:N    inside the save of checkpoint N: the temp dir exists and the state arrays are being
            written, the data item not yet (a torn, uncommitted checkpoint)
  commit:N  inside the commit of checkpoint N: every item written, the atomic rename not done
  async:N   right after checkpoint N's save was started, its async commit still in flight
LORA_JAX_TEST_ENOSPC=N makes the commit of checkpoint N fail with ENOSPC ("disk full") in the
background commit thread, as a full disk does mid-run.
LORA_JAX_TEST_STORAGE_DOWN="<step>:<pid>" SIGKILLs process <pid> (the GCS emulator) inside the
commit of checkpoint <step> (every item written, orbax's commit marker not yet): the storage goes
away mid-save, as a network fault does.
LORA_JAX_TEST_STEP_SLEEP=<seconds> makes every optimizer step that much slower (a stand-in for a
big model), so a signal sent from outside lands mid-run.
Without the variables this is plain `lora-jax`. The hooks wrap library functions from outside,
so production code carries no test switches.
"""

from __future__ import annotations

import os
import signal
import sys


def _die(where: str) -> None:
  sys.stderr.write(f"FAULT: SIGKILL at {where}\n")
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _step_of(directory) -> int | None:
  """The step of a checkpoint item dir: .../checkpoints/<step>[.orbax-checkpoint-tmp]/<item>."""
  for part in reversed(os.path.normpath(str(directory)).split(os.sep)):
    head = part.split(".", 1)[0]
    if head.isdigit():
      return int(head)
  return None


def install(spec: str) -> None:
  from lora_jax import checkpoint as ckpt
  from lora_jax.training.setup import Trainer
  where, _, n = spec.partition(":")
  target = int(n)

  if where == "step":
    step_fn = Trainer.step

    def step(self, host_batch):
      if int(self.state.step) + 1 == target:
        _die(spec)
      return step_fn(self, host_batch)

    Trainer.step = step
    return

  save_fn = ckpt.save

  def save(manager, step, *args, **kwargs):
    out = save_fn(manager, step, *args, **kwargs)
    if where == "async" and int(step) == target:
      _die(spec)
    return out

  ckpt.save = save
  if where == "save":
    data_save = ckpt.DataStateHandler.save

    def handler_save(self, directory, args):
      if _step_of(directory) == target:
        _die(spec)
      return data_save(self, directory, args)

    ckpt.DataStateHandler.save = handler_save
  elif where == "commit":
    data_finalize = ckpt.DataStateHandler.finalize

    def handler_finalize(self, directory):
      if _step_of(directory) == target:
        _die(spec)
      return data_finalize(self, directory)

    ckpt.DataStateHandler.finalize = handler_finalize
  elif where != "async":
    raise SystemExit(f"LORA_JAX_TEST_KILL={spec!r}: unknown fault point {where!r}")


def slow_steps(seconds: float) -> None:
  import time

  from lora_jax.training.setup import Trainer
  step_fn = Trainer.step

  def step(self, host_batch):
    time.sleep(seconds)
    return step_fn(self, host_batch)

  Trainer.step = step


def disk_full_at(target: int) -> None:
  import errno

  from lora_jax import checkpoint as ckpt
  finalize = ckpt.DataStateHandler.finalize

  def handler_finalize(self, directory):
    if _step_of(directory) == target:
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return finalize(self, directory)

  ckpt.DataStateHandler.finalize = handler_finalize


def storage_down_at(spec: str) -> None:
  import time

  from lora_jax import checkpoint as ckpt
  target, pid = (int(x) for x in spec.split(":"))
  finalize = ckpt.DataStateHandler.finalize

  def handler_finalize(self, directory):
    if _step_of(directory) == target:
      sys.stderr.write(f"FAULT: storage (pid {pid}) killed in the commit of checkpoint {target}\n")
      os.kill(pid, signal.SIGKILL)
      time.sleep(0.5)
    return finalize(self, directory)

  ckpt.DataStateHandler.finalize = handler_finalize


def main() -> int:
  spec = os.environ.get("LORA_JAX_TEST_KILL", "")
  if spec:
    install(spec)
  if os.environ.get("LORA_JAX_TEST_ENOSPC"):
    disk_full_at(int(os.environ["LORA_JAX_TEST_ENOSPC"]))
  if os.environ.get("LORA_JAX_TEST_STORAGE_DOWN"):
    storage_down_at(os.environ["LORA_JAX_TEST_STORAGE_DOWN"])
  if os.environ.get("LORA_JAX_TEST_STEP_SLEEP"):
    slow_steps(float(os.environ["LORA_JAX_TEST_STEP_SLEEP"]))
  from lora_jax.cli import main as cli_main
  return cli_main(sys.argv[1:])


if __name__ == "__main__":
  sys.exit(main())
