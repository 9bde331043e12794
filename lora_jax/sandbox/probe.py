"""Which protections this machine allows, found once by running a probe program in the sandbox."""

from __future__ import annotations

import os
import shutil
import sys
import threading

from lora_jax.sandbox import rundir
from lora_jax.sandbox.result import SandboxError
from lora_jax.sandbox.run import Tests, execute

PROTECTIONS = ("uid_switch", "user_ns", "net_ns", "pid_ns", "mount_ns", "ipc_ns", "proc",
               "readonly_fs", "private_tmp", "disk_budget", "no_nested_userns", "cgroup_budget")
# Runs the tests in their own process, as HumanEval does: the probe covers that path too.
_PROBE_SRC = "def echo(x):\n  return x\n"
_PROBE_TESTS = Tests("import sys\n\ndef check(candidate):\n  assert sys.flags.isolated\n"
                     "  assert candidate((1, [2.5, 'x'], {3})) == (1, [2.5, 'x'], {3})\n", "echo")

_info_lock = threading.Lock()
_info: dict | None = None


def _python_candidates(uid_switch: bool) -> list[str]:
  """LORA_JAX_SANDBOX_PYTHON if set; else this interpreter, or (under a per-run uid, which may not
  be able to read e.g. a venv under /root) the first system python3 that any user can run."""
  if os.environ.get("LORA_JAX_SANDBOX_PYTHON"):
    return [os.environ["LORA_JAX_SANDBOX_PYTHON"]]
  if not uid_switch:
    return [sys.executable]
  cands = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")]
  return [p for i, p in enumerate(cands) if p and p not in cands[:i] and rundir.other_can_use(p)]


def sandbox_info(refresh: bool = False) -> dict:
  """Which protections are active here, found by running a probe program (cached).

  Keys: the protection flags (uid_switch, user_ns, net_ns, pid_ns, mount_ns, ipc_ns, proc,
  readonly_fs, private_tmp: empty private /tmp, /var/tmp, /run; disk_budget: the run dir is a
  size- and inode-limited tmpfs; no_nested_userns: the program cannot create user namespaces;
  cgroup_budget: the whole run's memory and processes are capped by a cgroup),
  `root`, `python` (interpreter that runs the programs), `namespaces_enabled` and
  `notes` (why a protection is missing). Environment: LORA_JAX_SANDBOX_PYTHON picks the program
  interpreter; LORA_JAX_SANDBOX_NAMESPACES=0 skips namespaces (debugging; much weaker).
  """
  global _info
  with _info_lock:
    if _info is None or refresh:
      _info = _probe()
    return dict(_info)


def _probe() -> dict:
  if not sys.platform.startswith("linux"):
    raise SandboxError(f"the code execution sandbox needs Linux (/proc, namespaces, pidfds); "
                       f"this is {sys.platform}")
  root = os.geteuid() == 0
  namespaces = os.environ.get("LORA_JAX_SANDBOX_NAMESPACES", "1") != "0"
  notes = []
  tried = []
  for uid_switch in ([True, False] if root else [False]):
    for python in _python_candidates(uid_switch):
      tried.append(f"{python} (uid switch {uid_switch})")
      plan = {"uid_switch": uid_switch, "python": python, "require": {},
              "namespaces": namespaces, "cgroup": True}
      try:
        res, got = execute(_PROBE_SRC, plan, timeout_s=30.0, memory_mb=512, cpu_s=None,
                           max_procs=16, max_open_files=64, file_size_mb=1, disk_mb=1,
                           output_limit=4096, tmp_root=None, tests=_PROBE_TESTS)
      except SandboxError as e:
        notes.append(f"probe with {python} (uid switch {uid_switch}) could not start: {e}")
        continue
      if res.passed:
        info = {k: bool(got.get(k, False)) for k in PROTECTIONS}
        info.update(root=root, python=python, namespaces_enabled=namespaces, notes=notes)
        if root and not uid_switch:
          notes.append("running as root without a uid switch: RLIMIT_NPROC is not enforced")
        for k in PROTECTIONS:
          if not info[k]:
            notes.append(f"{k} not available: {got.get(k + '_error', 'not attempted')}")
        return info
      notes.append(f"probe with {python} (uid switch {uid_switch}) failed: {res.detail} "
                   f"{res.stderr[-300:]}")
  raise SandboxError("no interpreter could run the sandbox probe; tried " + ", ".join(tried) +
                     ". Set LORA_JAX_SANDBOX_PYTHON to a python3 readable by all users. " +
                     " | ".join(notes))
