"""Running one program under a sandbox plan: the launcher process, pumping its pipes, cleanup,
and the verdict (passed / failed / timed out).

A plan says which interpreter runs the program, whether to switch to a per-run uid, whether to
create namespaces, and which protections must be reported active (`require`; a protection that
was active when probed but fails now raises `SandboxError`).

Secrets (the per-run nonce and, with `Tests`, the test source) reach the wrapper through an
anonymous memory file, never through the run directory the program can read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time

from lora_jax.sandbox import cgroup, process, rundir as rundirs
from lora_jax.sandbox.launcher import LAUNCHER_SRC
from lora_jax.sandbox.result import ExecResult, SandboxError
from lora_jax.sandbox.wrapper import WRAPPER_SRC

INODES = 4096  # files + directories a program may create in its run dir (with a disk budget)
_SUPERVISORS = 4  # processes of a run besides the program's: launcher, PID 1, tests, solution


@dataclasses.dataclass(frozen=True)
class Tests:
  """Trusted test code, run in its own process against the program's `entry_point`.

  `source` defines `check(candidate)` (and whatever helpers it needs); after it ran, `entry_point`
  in its namespace and the `candidate` passed to `check` both forward calls to the program's
  function, with arguments and results copied as plain data.
  """
  source: str
  entry_point: str


class _Capture:
  """Drains a pipe, keeping the first `limit` bytes and counting the rest."""

  def __init__(self, limit: int):
    self.limit, self.data, self.total = limit, bytearray(), 0

  def feed(self, chunk: bytes):
    self.total += len(chunk)
    if len(self.data) < self.limit:
      self.data += chunk[:self.limit - len(self.data)]

  def text(self) -> str:
    s = self.data.decode("utf-8", errors="replace")
    if self.total > self.limit:
      s += f"\n[... {self.total - len(self.data)} more bytes]"
    return s


def execute(source: str, plan: dict, *, timeout_s, memory_mb, cpu_s, max_procs, max_open_files,
            file_size_mb, disk_mb, output_limit, tmp_root, nice=0,
            tests: Tests | None = None) -> tuple[ExecResult, dict]:
  """Run `source` under `plan`; the verdict and the protections the launcher reported."""
  t0 = time.monotonic()
  token = secrets.token_hex(8)
  nonce = secrets.token_hex(16).encode()
  tmp_root = os.path.abspath(tmp_root or tempfile.gettempdir())
  if plan["uid_switch"] and not rundirs.other_can_traverse(tmp_root):
    raise SandboxError(f"tmp_root {tmp_root} must be traversable by other users (o+x on it and "
                       "its parents): programs run under a separate uid")
  lease = process.UidLease() if plan["uid_switch"] else None
  pipes, proc, clean, rundir, cg = [], None, False, None, None
  try:
    rundir = rundirs.make_rundir(tmp_root, source, lease.uid if lease else None)
    cg, cg_error = (cgroup.create(token, memory_mb + disk_mb, max_procs + _SUPERVISORS)
                    if plan.get("cgroup") else (None, "not requested"))
    secret_fd = _secret_file(nonce, tests)
    res_r, res_w = os.pipe()
    st_r, st_w = os.pipe()
    pipes = [secret_fd, res_r, st_r]
    nproc = max_procs if lease else process.user_tasks() + max_procs
    cpu = math.ceil(cpu_s) if cpu_s is not None else math.ceil(timeout_s) + 1
    cfg = {
        "python": plan["python"], "wrapper": WRAPPER_SRC, "rundir": rundir,
        "fds": [secret_fd, res_w, st_w], "uid": lease.uid if lease else None,
        "namespaces": plan["namespaces"], "nice": max(0, int(nice)),
        "mode": "check" if tests else "program", "entry_point": tests.entry_point if tests else "",
        "limits": {"AS": memory_mb << 20, "CPU": cpu, "FSIZE": file_size_mb << 20,
                   "NOFILE": max_open_files, "NPROC": nproc, "CORE": 0},
        "disk_mb": disk_mb, "inodes": INODES, "ro_check": rundirs.readonly_checks(tmp_root),
        "cgroup_procs": cg.procs if cg else [], "cgroup_error": cg_error,
    }
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": rundir,
           "TMPDIR": os.path.join(rundir, "tmp"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           process.MARKER_ENV: token}
    try:
      proc = subprocess.Popen(
          [sys.executable, "-I", "-S", "-c", LAUNCHER_SRC, json.dumps(cfg)],
          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          cwd=rundir, env=env, pass_fds=(secret_fd, res_w, st_w), start_new_session=True)
    finally:
      for fd in (secret_fd, res_w, st_w):
        os.close(fd)
      pipes = [res_r, st_r]
    caps = {"out": _Capture(output_limit), "err": _Capture(output_limit),
            "res": _Capture(4096), "st": _Capture(1 << 16)}
    timed_out = _pump(proc, {proc.stdout.fileno(): caps["out"], proc.stderr.fileno(): caps["err"],
                             res_r: caps["res"], st_r: caps["st"]}, t0 + timeout_s)
    # Kill everything: the program's uid, the launcher's process group (while the launcher's pid
    # is still reserved by its zombie), and anything carrying this run's marker.
    if timed_out:
      if lease:
        process.kill_uid(lease.uid)
      process.signal_group(proc.pid, signal.SIGTERM)  # the launcher SIGKILLs the PID ns init
      deadline = time.monotonic() + 2.0
      while not process.exited(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.signal_group(proc.pid, signal.SIGKILL)
    if lease:
      clean = process.kill_uid(lease.uid)
    if not plan["uid_switch"]:
      clean = process.kill_marked(token)
    proc.wait()
    _pump(None, {proc.stdout.fileno(): caps["out"], proc.stderr.fileno(): caps["err"],
                 res_r: caps["res"], st_r: caps["st"]}, time.monotonic() + 1.0)
    return _verdict(caps, nonce, timed_out, plan, cpu, bool(cg and cg.oom_killed()),
                    time.monotonic() - t0, token, lease.uid if lease else None)
  finally:
    for fd in pipes:
      try:
        os.close(fd)
      except OSError:
        pass
    if proc is not None:
      for f in (proc.stdout, proc.stderr):
        f.close()
      if proc.returncode is None:
        process.signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    try:
      if rundir:
        rundirs.remove_rundir(rundir)
    finally:
      if cg:
        cg.remove()
      if lease:
        if not clean:
          clean = process.kill_uid(lease.uid)
        lease.release(clean)


def _secret_file(nonce: bytes, tests: Tests | None) -> int:
  """An unlinked memory file holding the nonce line and the test source, read from offset 0."""
  fd = os.memfd_create("lora_jax_sandbox_secret", 0)
  try:
    body = tests.source.encode("utf-8", "surrogatepass") if tests else b""
    os.write(fd, nonce + b"\n")
    view = memoryview(body)
    while view:
      view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
  except BaseException:
    os.close(fd)
    raise


def _pump(proc, captures: dict, deadline: float) -> bool:
  """Drain pipes until `proc` exits (or, with proc None, until EOF); True on deadline."""
  sel = selectors.DefaultSelector()
  for fd in captures:
    try:
      sel.register(fd, selectors.EVENT_READ)
    except (ValueError, KeyError, OSError):
      pass
  pidfd = None
  if proc is not None and hasattr(os, "pidfd_open"):
    try:
      pidfd = os.pidfd_open(proc.pid)
      sel.register(pidfd, selectors.EVENT_READ)
    except OSError:
      pidfd = None
  try:
    while True:
      if proc is not None and process.exited(proc.pid):
        return False
      if proc is None and not sel.get_map():
        return False
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        return proc is not None
      for key, _ in sel.select(min(remaining, 0.05 if pidfd is None else remaining)):
        if key.fd == pidfd:
          continue
        try:
          chunk = os.read(key.fd, 1 << 16)
        except OSError:
          chunk = b""
        if chunk:
          captures[key.fd].feed(chunk)
        else:
          sel.unregister(key.fd)
  finally:
    sel.close()
    if pidfd is not None:
      os.close(pidfd)


def _clean(text: str) -> str:
  """`text` with lone surrogates (which no UTF-8 writer accepts) spelled out as escapes."""
  return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _ended(status, cpu_s, cpu_limit: int, oom: bool) -> tuple[str, str]:
  """The verdict on a process that ended before the tests finished, from its wait status."""
  rc = os.waitstatus_to_exitcode(status)
  # Past the soft CPU limit the kernel sends SIGXCPU; a process that ignores it is SIGKILLed one
  # CPU second later, which is the same verdict.
  if rc == -signal.SIGXCPU or (rc == -signal.SIGKILL and cpu_s is not None and
                               cpu_s >= cpu_limit):
    return "timed_out", "timed out (cpu time limit)"
  if rc < 0:
    name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
    extra = {"SIGXFSZ": " (file size limit)",
             "SIGKILL": " (out of the run's memory budget)" if oom else " (killed)"}.get(name, "")
    return "failed", f"failed: killed by {name}{extra}"
  return "failed", f"failed: exited with code {rc} before the tests finished"


def _verdict(caps, nonce: bytes, timed_out: bool, plan: dict, cpu_limit: int, oom: bool,
             duration: float, run_id: str, uid: int | None):
  status = {}
  for line in bytes(caps["st"].data).decode("utf-8", "replace").splitlines():
    tag, _, payload = line.partition(" ")
    try:
      status[tag] = json.loads(payload)
    except ValueError:
      pass
  if "E" in status:
    raise SandboxError(f"sandbox setup failed: {status['E'].get('error')}")
  got = status.get("S") or {}
  missing = [k for k, v in plan["require"].items() if v and not got.get(k)]
  if status.get("S") is not None and missing:
    raise SandboxError(f"protections {missing} were active when probed but failed now: {got}")
  ended = status.get("X") or {}
  wait = ended.get("status")
  rc = None if wait is None else os.waitstatus_to_exitcode(wait)
  res = bytes(caps["res"].data)
  out, err = caps["out"].text(), caps["err"].text()

  def result(st, detail):
    return ExecResult(st, _clean(detail), rc, out, err, round(duration, 4), run_id, uid), got

  if timed_out:
    return result("timed_out", "timed out")
  if wait is not None and rc < 0 and _ended(wait, ended.get("cpu_s"), cpu_limit,
                                            oom)[0] == "timed_out":
    return result(*_ended(wait, ended.get("cpu_s"), cpu_limit, oom))
  if res == b"P " + nonce + b"\n" and rc == 0:
    return result("passed", "passed")
  if b"P " + nonce in res:
    return result("failed", "failed: result channel tampered with")
  for line in res.decode("utf-8", "replace").splitlines():
    if line.startswith("F "):
      try:
        info = json.loads(line[2:])
        if isinstance(info.get("exit"), dict) and info["exit"].get("status") is not None:
          return result(*_ended(info["exit"]["status"], info["exit"].get("cpu_s"), cpu_limit,
                                oom))
        return result("failed", f"failed: {info['type']}" +
                      (f": {info['message']}" if info.get("message") else ""))
      except (ValueError, KeyError, TypeError, AttributeError):
        break
  if wait is None:
    return result("failed", "failed: sandbox supervisor was killed")
  return result(*_ended(wait, ended.get("cpu_s"), cpu_limit, oom))
