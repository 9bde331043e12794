"""The launcher: puts a run into its cgroup, namespaces, mounts, limits and uid (source string).

LAUNCHER_SRC runs as `python -I -S -c LAUNCHER_SRC '<json config>'` with the evaluator's
privileges. It joins the run's cgroup (whole-run memory and process budget) if there is one,
creates what namespaces it can, forks a child and waits for it:

  child: setsid -> private mounts: fresh /proc, empty private /tmp, /var/tmp, /run (no filesystem
  sockets of the host are reachable there), a size- and inode-limited tmpfs as the run dir, every
  other mount read-only -> rlimits -> per-run uid (root only) -> a user namespace that may create
  no further user namespaces -> no_new_privs, parent-death SIGKILL -> exec `python -I -B -c
  WRAPPER_SRC <secret fd> <result fd> <mode> <entry point>` (wrapper.py). With a PID namespace
  the child stays as the namespace's PID 1 (`ns_init`) and the program is its child: the program
  then has ordinary signal semantics, and when PID 1 exits the kernel kills everything left in
  the namespace.

Status lines on the status pipe (closed on exec, never visible to the program): "C {pid}" after
the fork, "S {protections}" before the program starts, "E {error}" if set-up failed, "X {wait
status, cpu seconds}" when the program ended (written by PID 1, or by the launcher without a PID
namespace). On SIGTERM the launcher SIGKILLs its child (PID 1 takes the namespace with it);
without a PID namespace it kills and reaps whatever was re-parented to it (a child subreaper).
"""

LAUNCHER_SRC = r'''
import ctypes, json, os, resource, signal, sys, time
cfg = json.loads(sys.argv[1])
secret_fd, res_fd, st_fd = cfg["fds"]


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
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/run", "/var/run")
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


def lock_user_namespaces():
  """No user namespace may be created inside the current one (its ucount limit is 0)."""
  try:
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
      f.write("0")
    got["no_nested_userns"] = True
  except OSError as e:
    got["no_nested_userns"], got["no_nested_userns_error"] = False, str(e)


def fill_rundir(rundir, files, uid):
  for name, data in files.items():
    with open(os.path.join(rundir, name), "wb") as f:
      f.write(data)
  os.mkdir(os.path.join(rundir, "tmp"))
  if uid is not None:
    for name in list(files) + ["tmp"]:
      os.chown(os.path.join(rundir, name), uid, uid)


def setup_mounts():
  """Private mounts. The host's run dir keeps only main.py: the program writes to a tmpfs that is
  gone with the namespace, so no file it makes can outlive the run or escape the disk budget."""
  rundir, uid = cfg["rundir"], cfg["uid"]
  files = {}
  with open(os.path.join(rundir, "main.py"), "rb") as f:
    files["main.py"] = f.read()
  mount("none", "/", None, REC | PRIVATE)
  if got.get("pid_ns"):
    try:
      mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)
      got["proc"] = True
    except OSError as e:
      got["proc"], got["proc_error"] = False, str(e)
  private, errors = [], []
  for d in PRIVATE_DIRS:
    real = os.path.realpath(d)
    if real in private or not os.path.isdir(real):
      continue
    try:
      mount("tmpfs", real, "tmpfs", NOSUID | NODEV | NOEXEC, "size=64k,nr_inodes=256,mode=755")
      private.append(real)
    except OSError as e:
      errors.append(f"{real}: {e}")
  got["private_tmp"] = not errors
  if errors:
    got["private_tmp_error"] = "; ".join(errors)
  os.makedirs(rundir, exist_ok=True)  # re-made inside a private /tmp when it lived there
  owner = "" if uid is None else f",uid={uid},gid={uid}"
  try:
    mount("tmpfs", rundir, "tmpfs", NOSUID | NODEV,
          f"size={cfg['disk_mb']}m,nr_inodes={cfg['inodes']},mode=700{owner}")
    got["disk_budget"] = True
  except OSError as e:
    got["disk_budget"], got["disk_budget_error"] = False, str(e)
    mount(rundir, rundir, None, BIND | REC)
    mount(None, rundir, None, REMOUNT | BIND | NOSUID | NODEV | kept_flags(rundir))
  if got["disk_budget"] or not os.path.exists(os.path.join(rundir, "main.py")):
    fill_rundir(rundir, files, uid)
  shm = "/dev/shm"
  if os.path.isdir(shm) and not rundir.startswith(shm + "/"):
    try:
      mount("tmpfs", shm, "tmpfs", NOSUID | NODEV | NOEXEC, "size=1m,nr_inodes=64,mode=1777")
    except OSError:
      pass
  with open("/proc/self/mountinfo") as f:
    points = sorted({unescape(line.split()[4]) for line in f})
  # A fresh /proc stays writable: the per-run uid has no capability that /proc/sys would honour,
  # and root's user-namespace lock (lock_user_namespaces) writes there after the uid switch.
  keep = {rundir, shm} | ({"/proc"} if got.get("proc") else set())
  for mp in points:
    if mp not in keep:
      try:
        mount(None, mp, None, REMOUNT | BIND | RDONLY | kept_flags(mp))
      except OSError:
        pass
  bad = [p for p in cfg["ro_check"] if os.path.exists(p) and not os.statvfs(p).f_flag & 1]
  if os.statvfs(rundir).f_flag & 1:
    bad.append(rundir + " (run dir is read-only)")
  got["readonly_fs"] = not bad
  if bad:
    got["readonly_fs_error"] = "still writable: " + ", ".join(bad)


def own_user_namespace(uid):
  """Root's path: after the uid switch, enter a user namespace mapping only `uid` and lock it."""
  check(libc.prctl(4, 1, 0, 0, 0))  # PR_SET_DUMPABLE: the uid switch made /proc/self root's
  try:
    check(libc.unshare(NEWUSER))
  except OSError as e:
    got["no_nested_userns"], got["no_nested_userns_error"] = False, f"unshare: {e}"
    return
  check(libc.prctl(4, 1, 0, 0, 0))
  for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                     ("gid_map", f"{uid} {uid} 1")):
    with open(f"/proc/self/{name}", "w") as f:
      f.write(text)
  lock_user_namespaces()


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
      if got.get("proc") and cfg["namespaces"]:
        own_user_namespace(uid)
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
  os.execve(py, [py, "-I", "-B", "-c", cfg["wrapper"], str(secret_fd), str(res_fd), cfg["mode"],
                 cfg["entry_point"]], os.environ)


def cpu_seconds(ru):
  return ru.ru_utime + ru.ru_stime


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
  os.close(secret_fd)
  os.close(res_fd)
  check(libc.prctl(4, 0, 0, 0, 0))  # PR_SET_DUMPABLE 0: the program cannot open /proc/1/fd
  signal.signal(signal.SIGINT, signal.SIG_DFL)
  status, cpu = None, None
  while True:
    try:
      pid, st, ru = os.wait4(-1, 0)
    except ChildProcessError:
      break
    if pid == prog:
      status, cpu = st, cpu_seconds(ru)
      break
  report("X", {"status": status, "cpu_s": cpu})
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


if cfg["cgroup_procs"]:  # first, so every process of the run is inside the run's cgroup
  try:
    for path in cfg["cgroup_procs"]:
      with open(path, "w") as f:
        f.write(str(os.getpid()))
    got["cgroup_budget"] = True
  except OSError as e:
    got["cgroup_budget"], got["cgroup_budget_error"] = False, f"joining {path}: {e}"
else:
  got["cgroup_budget"], got["cgroup_budget_error"] = False, cfg["cgroup_error"]
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
    lock_user_namespaces()
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
for key in ("proc", "readonly_fs", "uid_switch", "private_tmp", "disk_budget", "no_nested_userns"):
  got.setdefault(key, False)
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
os.close(secret_fd)
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
  _, status, usage = os.wait4(pid, 0)
  cpu = cpu_seconds(usage)
except ChildProcessError:
  status, cpu = None, None
if not got.get("pid_ns"):  # else PID 1 of the namespace reported the program's status
  report("X", {"status": status, "cpu_s": cpu})
  reap_orphans()
os._exit(0)
'''
