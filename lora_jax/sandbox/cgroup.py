"""A cgroup per run: the whole run's memory and process budget, not just each process's rlimits.

cgroup v2 where the evaluator's cgroup delegates `memory` and `pids` to children, else cgroup v1
`memory` + `pids` hierarchies; `create` returns None with the reason when neither can be made
(e.g. an unprivileged evaluator without a delegated subtree), and `sandbox_info()` reports it.
The evaluator makes the cgroup; the launcher joins it before it forks, so every process of the run
is inside and none can leave (the cgroup files belong to the evaluator, not the per-run uid).
"""

from __future__ import annotations

import os
import time

from lora_jax.sandbox.rundir import RUN_PREFIX


def _mounts() -> dict[str, str]:
  """'v2' -> the cgroup2 mount point; 'memory' / 'pids' -> their cgroup v1 mount points."""
  out = {}
  with open("/proc/self/mountinfo") as f:
    for line in f:
      fields = line.split()
      sep = fields.index("-")
      fstype, opts = fields[sep + 1], fields[sep + 3].split(",")
      if fstype == "cgroup2":
        out.setdefault("v2", fields[4])
      elif fstype == "cgroup":
        for ctrl in ("memory", "pids"):
          if ctrl in opts:
            out.setdefault(ctrl, fields[4])
  return out


def _own_paths() -> dict[str, str]:
  """This process's cgroup path per hierarchy: 'v2', or a v1 controller name."""
  out = {}
  with open("/proc/self/cgroup") as f:
    for line in f:
      num, ctrls, path = line.rstrip("\n").split(":", 2)
      if num == "0" and ctrls == "":
        out["v2"] = path
      for ctrl in ctrls.split(","):
        if ctrl in ("memory", "pids"):
          out[ctrl] = path
  return out


def _write(path: str, value: str) -> None:
  with open(path, "w") as f:
    f.write(value)


class RunCgroup:
  """The cgroup directories of one run; `procs` are the files a process joins by writing its pid."""

  def __init__(self, dirs: list[str], version: int):
    self.dirs, self.version = dirs, version
    self.procs = [os.path.join(d, "cgroup.procs") for d in dirs]

  def oom_killed(self) -> bool:
    """Whether the kernel killed a process of this run for the run's memory budget."""
    name = "memory.events" if self.version == 2 else "memory.oom_control"
    for d in self.dirs:
      try:
        with open(os.path.join(d, name)) as f:
          for line in f:
            key, _, value = line.partition(" ")
            if key == "oom_kill" and int(value) > 0:
              return True
      except (OSError, ValueError):
        pass
    return False

  def remove(self, timeout_s: float = 2.0) -> None:
    """Remove the directories once their (already killed) processes are gone."""
    deadline = time.monotonic() + timeout_s
    for d in self.dirs:
      while True:
        try:
          os.rmdir(d)
          break
        except FileNotFoundError:
          break
        except OSError:
          if time.monotonic() > deadline:
            break
          time.sleep(0.01)


def create(token: str, memory_mb: int, max_pids: int) -> tuple[RunCgroup | None, str]:
  """A fresh cgroup for one run with these budgets, or (None, why not)."""
  try:
    mounts, own = _mounts(), _own_paths()
  except OSError as e:
    return None, f"cannot read cgroups: {e}"
  name = RUN_PREFIX + token
  errors = []
  if "v2" in mounts and "v2" in own:
    parent = os.path.join(mounts["v2"], own["v2"].lstrip("/"))
    try:
      with open(os.path.join(parent, "cgroup.subtree_control")) as f:
        enabled = f.read().split()
      if not {"memory", "pids"} <= set(enabled):
        _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids")
      d = os.path.join(parent, name)
      os.mkdir(d)
      cg = RunCgroup([d], 2)
      try:
        _write(os.path.join(d, "memory.max"), str(memory_mb << 20))
        if os.path.exists(os.path.join(d, "memory.swap.max")):
          _write(os.path.join(d, "memory.swap.max"), "0")
        _write(os.path.join(d, "pids.max"), str(max_pids))
      except OSError:
        cg.remove()
        raise
      return cg, ""
    except OSError as e:
      errors.append(f"cgroup v2 at {parent}: {e}")
  if "memory" in mounts and "pids" in mounts and "memory" in own and "pids" in own:
    dirs = []
    try:
      for ctrl in ("memory", "pids"):
        d = os.path.join(mounts[ctrl], own[ctrl].lstrip("/"), name)
        os.mkdir(d)
        dirs.append(d)
      mem = dirs[0]
      _write(os.path.join(mem, "memory.limit_in_bytes"), str(memory_mb << 20))
      if os.path.exists(os.path.join(mem, "memory.memsw.limit_in_bytes")):
        _write(os.path.join(mem, "memory.memsw.limit_in_bytes"), str(memory_mb << 20))
      _write(os.path.join(dirs[1], "pids.max"), str(max_pids))
      return RunCgroup(dirs, 1), ""
    except OSError as e:
      RunCgroup(dirs, 1).remove()
      errors.append(f"cgroup v1: {e}")
  return None, "; ".join(errors) or "no cgroup v2 or v1 memory + pids hierarchy"
