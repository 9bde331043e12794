"""Process control for the sandbox: per-run uid leases, finding and killing a run's processes.

A run's processes are found by their per-run uid (when the evaluator is root) or by the marker
token in their environment (`MARKER_ENV`), by scanning /proc; kills go through pidfds where the
OS has them, so a reused pid is never hit.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from typing import Iterable

from lora_jax.sandbox.result import ExecResult, SandboxError

MARKER_ENV = "LORA_JAX_SANDBOX"     # set to a per-run token in every program's environment
UID_BASE, UID_SLOTS = 2_100_000_000, 4096  # per-run uids when the evaluator is root


class UidLease:
  """A free uid from the pool (or, with `uid`, that uid if free: `held` says whether it was).

  Exclusive across threads and processes: holding a uid is binding an abstract unix socket.
  """

  def __init__(self, uid: int | None = None):
    self.held = False
    start = random.randrange(UID_SLOTS)
    cands = ([uid] if uid is not None else
             (UID_BASE + (start + i) % UID_SLOTS for i in range(UID_SLOTS)))
    for cand in cands:
      sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
      try:
        sock.bind(f"\0lora_jax_sandbox_uid_{cand}")
      except OSError:
        sock.close()
        continue
      if uid is None and not kill_uid(cand):  # a crashed evaluator may have left processes
        sock.close()
        continue
      self.uid, self._sock, self.held = cand, sock, True
      return
    if uid is None:
      raise SandboxError(f"all {UID_SLOTS} sandbox uids from {UID_BASE} are in use")

  def release(self, clean: bool):
    if self.held and clean:  # an uid whose processes could not all be killed stays reserved
      self._sock.close()


def _proc_status(pid: str) -> dict[str, str]:
  out = {}
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key in ("State", "Uid", "PPid"):
          out[key] = value.strip()
  except OSError:
    pass
  return out


def _live_pids(match) -> list[int]:
  pids = []
  for name in os.listdir("/proc"):
    if name.isdigit():
      st = _proc_status(name)
      if st and st.get("State", "Z")[:1] not in ("Z", "X") and match(name, st):
        pids.append(int(name))
  return pids


def _signal_pid(pid: int, check) -> None:
  """SIGKILL `pid` if `check(pid)` still holds, race-free against pid reuse when pidfd exists."""
  try:
    if hasattr(os, "pidfd_open"):
      fd = os.pidfd_open(pid)
      try:
        if check(str(pid)):
          signal.pidfd_send_signal(fd, signal.SIGKILL)
      finally:
        os.close(fd)
    elif check(str(pid)):
      os.kill(pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError, OSError):
    pass


def _kill_matching(match, timeout_s: float = 10.0) -> bool:
  """Kill every live process `match` selects until none is left; False if some survive."""
  deadline = time.monotonic() + timeout_s
  delay = 0.001
  while True:
    pids = _live_pids(match)
    if not pids:
      return True
    if time.monotonic() > deadline:
      return False
    for pid in pids:
      _signal_pid(pid, lambda p: match(p, _proc_status(p)))
    time.sleep(delay)
    delay = min(delay * 2, 0.05)


def kill_uid(uid: int) -> bool:
  return _kill_matching(lambda pid, st: str(uid) in st.get("Uid", "").split())


def _has_marker(pid: str, token: str) -> bool:
  try:
    with open(f"/proc/{pid}/environ", "rb") as f:
      return f"{MARKER_ENV}={token}".encode() in f.read().split(b"\0")
  except OSError:
    return False


def kill_marked(token: str) -> bool:
  me = str(os.getuid())
  return _kill_matching(lambda pid, st: me in st.get("Uid", "").split()[:1] and
                        _has_marker(pid, token), timeout_s=5.0)


def leaked_processes(results: Iterable[ExecResult]) -> list[int]:
  """Live processes left behind by these runs (their uid or marker); should always be [].

  A per-run uid that another run holds right now is skipped (its processes are not leaks yet).
  """
  pids = set()
  for r in results:
    if r.run_id:
      pids.update(_live_pids(lambda pid, st, t=r.run_id: _has_marker(pid, t)))
    if r.uid is not None:
      lease = UidLease(r.uid)
      if lease.held:
        try:
          pids.update(_live_pids(lambda pid, st, u=str(r.uid): u in st.get("Uid", "").split()))
        finally:
          lease.release(True)
  return sorted(pids)


def signal_group(pgid: int, sig: int) -> None:
  try:
    os.killpg(pgid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def user_tasks() -> int:
  """Threads the evaluating uid runs now (RLIMIT_NPROC counts them when there is no per-run uid)."""
  me = str(os.getuid())
  n = 0
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/status") as f:
          fields = dict(line.split(":", 1) for line in f if ":" in line)
        if fields.get("Uid", "").split()[:1] == [me]:
          n += int(fields.get("Threads", "1"))
      except (OSError, ValueError):
        pass
  return n


def exited(pid: int) -> bool:
  """Whether `pid` (our child) has exited, without reaping it (its pid and pgid stay reserved)."""
  try:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
  except ChildProcessError:
    return True
