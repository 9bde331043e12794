"""Code that runs on the child side of the sandbox (see run.py), kept as source strings.

LAUNCHER_SRC runs as `python -I -S -c LAUNCHER_SRC '<json config>'` with the evaluator's
privileges. It creates what namespaces it can, forks a child and waits for it:

  child: setsid -> private mounts, fresh /proc, every mount read-only except the run dir, private
  /dev/shm -> rlimits -> per-run uid (root only) -> no_new_privs, parent-death SIGKILL -> exec
  `python -I -B -c WRAPPER_SRC <nonce fd> <result fd>`. With a PID namespace the child stays as
  the namespace's PID 1 (`ns_init`) and the program is its child: the program then has ordinary
  signal semantics, and when PID 1 exits the kernel kills everything left in the namespace.

Status lines on the status pipe (closed on exec, never visible to the program): "C {pid}" after
the fork, "S {protections}" before the program starts, "E {error}" if set-up failed, "X {wait
status}" when the program ended (written by PID 1, or by the launcher without a PID namespace).
On SIGTERM the launcher SIGKILLs its child (PID 1 takes the namespace with it); without a PID
namespace it kills and reaps whatever was re-parented to it (it is a child subreaper).

WRAPPER_SRC reads the nonce, closes that pipe, executes main.py in a fresh `__main__` dict and
writes "P <nonce>" only if that returned normally ("F {type, message}" otherwise).
"""

LAUNCHER_SRC = r'''
import ctypes, json, os, resource, signal, sys, time
cfg = json.loads(sys.argv[1])
nonce_fd, res_fd, st_fd = cfg["fds"]


def report(tag, obj):
  os.write(st_fd, (tag + " " + json.dumps(obj) + "\n").encode())


libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4


def check(ret):
  if ret != 0:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def enc(s):
  return None if s is None else s.encode()


NEWNS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT = 1, 2, 4, 8, 32
NOATIME, NODIRATIME, BIND, REC, PRIVATE, RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
got = {}


def mount(src, target, fstype, flags, data=None):
  check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)))


def kept_flags(path):
  f = os.statvfs(path).f_flag
  out = f & (NOSUID | NODEV | NOEXEC)
  out |= (NOATIME if f & os.ST_NOATIME else 0) | (NODIRATIME if f & os.ST_NODIRATIME else 0)
  return out | (RELATIME if f & os.ST_RELATIME else 0)


def unescape(s):
  out, i = [], 0
  while i < len(s):
    if s[i] == "\\" and s[i + 1:i + 4].isdigit():
      out.append(chr(int(s[i + 1:i + 4], 8)))
      i += 4
    else:
      out.append(s[i])
      i += 1
  return "".join(out)


def setup_mounts():
  rundir = cfg["rundir"]
  mount("none", "/", None, REC | PRIVATE)
  if got.get("pid_ns"):
    try:
      mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)
      got["proc"] = True
    except OSError as e:
      got["proc"], got["proc_error"] = False, str(e)
  mount(rundir, rundir, None, BIND | REC)
  mount(None, rundir, None, REMOUNT | BIND | NOSUID | NODEV | kept_flags(rundir))
  with open("/proc/self/mountinfo") as f:
    points = sorted({unescape(line.split()[4]) for line in f})
  for mp in points:
    if mp != rundir:
      try:
        mount(None, mp, None, REMOUNT | BIND | RDONLY | kept_flags(mp))
      except OSError:
        pass
  if os.path.isdir("/dev/shm") and not rundir.startswith("/dev/shm/"):
    try:
      mount("tmpfs", "/dev/shm", "tmpfs", NOSUID | NODEV | NOEXEC, "size=16m,mode=1777")
    except OSError:
      pass
  bad = [p for p in cfg["ro_check"] if os.path.exists(p) and not os.statvfs(p).f_flag & 1]
  if os.statvfs(rundir).f_flag & 1:
    bad.append(rundir + " (run dir is read-only)")
  got["readonly_fs"] = not bad
  if bad:
    got["readonly_fs_error"] = "still writable: " + ", ".join(bad)


def child(alive_r):
  try:
    os.setsid()  # killpg(0) / kill(0) from the program cannot reach the launcher
    os.set_inheritable(st_fd, False)
    if got.get("mount_ns"):
      setup_mounts()
    for name, value in cfg["limits"].items():
      rlim = getattr(resource, "RLIMIT_" + name)
      hard = resource.getrlimit(rlim)[1]
      soft = value if hard == resource.RLIM_INFINITY else min(value, hard)
      top = soft + 1 if name == "CPU" else soft
      resource.setrlimit(rlim, (soft, top if hard == resource.RLIM_INFINITY else min(top, hard)))
    if cfg["nice"]:
      os.nice(cfg["nice"])
    uid = cfg["uid"]
    if uid is not None:
      os.setgroups([])
      os.setresgid(uid, uid, uid)
      os.setresuid(uid, uid, uid)
      got["uid_switch"] = os.getresuid() == (uid, uid, uid) and os.geteuid() != 0
    check(libc.prctl(38, 1, 0, 0, 0))  # PR_SET_NO_NEW_PRIVS: setuid binaries cannot elevate
    check(libc.prctl(1, signal.SIGKILL, 0, 0, 0))  # PR_SET_PDEATHSIG
    os.set_blocking(alive_r, False)
    try:
      if os.read(alive_r, 1) == b"":
        os._exit(1)  # the launcher died before the death signal was armed
    except BlockingIOError:
      pass
    os.close(alive_r)
    os.chdir(cfg["rundir"])
    report("S", got)
    if got.get("pid_ns"):
      ns_init()
    exec_program()
  except BaseException as e:
    try:
      report("E", {"error": f"{type(e).__name__}: {e}"})
    finally:
      os._exit(127)


def exec_program():
  py = cfg["python"]
  os.execve(py, [py, "-I", "-B", "-c", cfg["wrapper"], str(nonce_fd), str(res_fd)], os.environ)


def ns_init():
  """PID 1 of the namespace: runs the program as its child, so the program gets ordinary signal
  semantics (init ignores default-action signals), reaps orphans, reports the program's wait
  status, and exits, which makes the kernel kill every process left in the namespace."""
  prog = os.fork()
  if prog == 0:
    try:
      exec_program()
    except BaseException as e:
      report("E", {"error": f"exec failed: {type(e).__name__}: {e}"})
    os._exit(127)
  os.close(nonce_fd)
  os.close(res_fd)
  check(libc.prctl(4, 0, 0, 0, 0))  # PR_SET_DUMPABLE 0: the program cannot open /proc/1/fd
  signal.signal(signal.SIGINT, signal.SIG_DFL)
  status = None
  while True:
    try:
      pid, st = os.waitpid(-1, 0)
    except ChildProcessError:
      break
    if pid == prog:
      status = st
      break
  report("X", {"status": status})
  os._exit(0)


def reap_orphans():
  me = os.getpid()
  deadline = time.monotonic() + 3.0
  while time.monotonic() < deadline:
    kids = []
    for name in os.listdir("/proc"):
      if name.isdigit():
        try:
          with open(f"/proc/{name}/stat") as f:
            if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
              kids.append(int(name))
        except (OSError, ValueError, IndexError):
          pass
    for pid in kids:
      try:
        os.kill(pid, signal.SIGKILL)
      except OSError:
        pass
    try:
      while os.waitpid(-1, os.WNOHANG)[0] > 0:
        pass
    except ChildProcessError:
      if not kids:
        return
    time.sleep(0.005)


root = os.geteuid() == 0
if not cfg["namespaces"]:
  got["user_ns"], got["user_ns_error"] = False, "disabled (LORA_JAX_SANDBOX_NAMESPACES=0)"
elif root:
  got["user_ns"], got["user_ns_error"] = False, "not needed (running as root)"
else:
  uid, gid = os.getuid(), os.getgid()
  try:
    check(libc.unshare(NEWUSER))
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):
      with open(f"/proc/self/{name}", "w") as f:
        f.write(text)
    got["user_ns"] = True
  except OSError as e:
    got["user_ns"], got["user_ns_error"] = False, str(e)
for name, flag in (("net_ns", NEWNET), ("pid_ns", NEWPID), ("mount_ns", NEWNS), ("ipc_ns", NEWIPC)):
  if not cfg["namespaces"]:
    got[name], got[name + "_error"] = False, "disabled (LORA_JAX_SANDBOX_NAMESPACES=0)"
  elif root or got["user_ns"]:
    try:
      check(libc.unshare(flag))
      got[name] = True
    except OSError as e:
      got[name], got[name + "_error"] = False, str(e)
  else:
    got[name], got[name + "_error"] = False, "needs root or an unprivileged user namespace"
got.setdefault("proc", False)
got.setdefault("readonly_fs", False)
got.setdefault("uid_switch", False)
try:
  check(libc.prctl(36, 1, 0, 0, 0))  # PR_SET_CHILD_SUBREAPER: orphans come back to us
except OSError:
  pass
alive_r, alive_w = os.pipe()
pid = os.fork()
if pid == 0:
  os.close(alive_w)
  child(alive_r)
os.close(alive_r)
os.close(nonce_fd)
os.close(res_fd)
report("C", {"pid": pid})


def on_term(signum, frame):
  try:
    os.kill(pid, signal.SIGKILL)
  except OSError:
    pass


for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
  signal.signal(s, on_term)
try:
  status = os.waitpid(pid, 0)[1]
except ChildProcessError:
  status = None
if not got.get("pid_ns"):  # else PID 1 of the namespace reported the program's status
  report("X", {"status": status})
  reap_orphans()
os._exit(0)
'''

WRAPPER_SRC = r'''
import os, sys, json, traceback


def _main():
  write, exit_, nfd, rfd = os.write, os._exit, int(sys.argv[1]), int(sys.argv[2])
  nonce = b""
  while True:
    chunk = os.read(nfd, 64)
    if not chunk:
      break
    nonce += chunk
  os.close(nfd)
  os.set_inheritable(rfd, False)
  sys.argv[:] = ["main.py"]
  try:
    with open("main.py", "rb") as f:
      code = compile(f.read(), "main.py", "exec")
    scope = {"__name__": "__main__", "__file__": os.path.abspath("main.py"),
             "__builtins__": __builtins__}
    exec(code, scope)
  except BaseException as e:
    info = {"type": type(e).__name__, "message": ""}
    try:
      traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # skip this frame
      info["message"] = str(e)[:500]
    except BaseException:
      pass
    try:
      write(rfd, ("F " + json.dumps(info) + "\n").encode())
      sys.stdout.flush()
    except BaseException:
      pass
    exit_(1)
  for s in (sys.stdout, sys.stderr):
    try:
      s.flush()
    except BaseException:
      pass
  write(rfd, b"P " + nonce + b"\n")
  exit_(0)


_main()
'''
