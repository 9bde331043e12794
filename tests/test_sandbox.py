"""Sandbox basics: verdicts, limits, isolation of the environment, clean-up, parallel runs."""

import os
import subprocess
import tempfile
import time

import pytest

from lora_jax import sandbox


@pytest.fixture(scope="module")
def tmp_root():
  # World-traversable (the program may run under another uid) and private to this module, so
  # "no run directory left behind" can be checked exactly.
  d = tempfile.mkdtemp(prefix="lora_jax_sbx_test_")
  os.chmod(d, 0o711)
  yield d
  assert os.listdir(d) == [], "run directories left behind"
  os.rmdir(d)


def _run(src, tmp_root, **kw):
  kw.setdefault("timeout_s", 10.0)
  return sandbox.run_program(src, tmp_root=tmp_root, **kw)


def test_info_reports_protections():
  info = sandbox.sandbox_info()
  for key in ("uid_switch", "net_ns", "pid_ns", "mount_ns", "readonly_fs", "root", "python"):
    assert key in info
  assert os.path.exists(info["python"])
  if info["root"] and info["mount_ns"]:
    assert info["uid_switch"]  # root with namespaces must also drop to an unprivileged uid


def test_verdicts(tmp_root):
  cases = [
      ("x = 1\nassert x == 1\n", "passed", "passed"),
      ("assert 1 == 2, 'nope'\n", "failed", "failed: AssertionError: nope"),
      ("raise ValueError('bad')\n", "failed", "failed: ValueError: bad"),
      ("import sys\nsys.exit(0)\n", "failed", "failed: SystemExit: 0"),
      ("import os\nos._exit(0)\n", "failed", "failed: exited with code 0 before the tests"),
      ("def f(:\n", "failed", "failed: SyntaxError"),
      ("", "passed", "passed"),
  ]
  results = sandbox.run_many([c[0] for c in cases], workers=2, tmp_root=tmp_root, timeout_s=10)
  for (src, status, detail), r in zip(cases, results):
    assert r.status == status, (src, r)
    assert r.result.startswith(detail), (src, r.result)
    assert r.passed == (status == "passed")
  assert "Traceback" in results[2].stderr and "ValueError: bad" in results[2].stderr


# Beyond the 1 s timeout: interpreter start, kill and reap of the run on a loaded 2-core machine.
# The bound catches a run that far outlives its timeout; it need not be tight.
TIMEOUT_SLACK_S = 20.0


def test_timeout_is_enforced_and_reported(tmp_root):
  t0 = time.monotonic()
  r = _run("import time\nwhile True:\n  time.sleep(0.01)\n", tmp_root, timeout_s=1.0)
  elapsed = time.monotonic() - t0
  assert r.status == "timed_out" and r.result == "timed out"
  assert elapsed < 1.0 + TIMEOUT_SLACK_S


def test_cpu_limit_counts_as_timeout(tmp_root):
  # Four busy threads burn CPU time faster than wall time: RLIMIT_CPU (SIGXCPU) fires first.
  src = ("import threading\n"
         "def spin():\n  while True: pass\n"
         "for _ in range(4): threading.Thread(target=spin, daemon=True).start()\n"
         "spin()\n")
  r = _run(src, tmp_root, timeout_s=30.0, cpu_s=1)
  assert r.status == "timed_out" and r.result == "timed out (cpu time limit)", r


def test_stdout_is_captured_and_capped(tmp_root):
  r = _run("print('hello')\nimport sys\nsys.stderr.write('err' * 10)\n", tmp_root)
  assert r.passed and r.stdout == "hello\n" and r.stderr == "err" * 10
  r = _run("import sys\nfor _ in range(100):\n  sys.stdout.write('x' * 10000)\n", tmp_root,
           output_limit=1000)
  assert r.passed
  assert r.stdout.startswith("x" * 1000) and "more bytes" in r.stdout and len(r.stdout) < 1100


def test_environment_is_scrubbed_and_isolated(tmp_root, monkeypatch):
  monkeypatch.setenv("LORA_JAX_TEST_SECRET", "s3cret")
  src = ("import os, sys, tempfile\n"
         "assert 'LORA_JAX_TEST_SECRET' not in os.environ, os.environ\n"
         "assert sys.flags.isolated == 1\n"
         "cwd = os.getcwd()\n"
         "assert os.environ['HOME'] == cwd, (os.environ['HOME'], cwd)\n"
         "assert tempfile.gettempdir().startswith(cwd)\n"
         "assert sys.stdin.read() == ''\n"
         "open('scratch.txt', 'w').write('ok')\n"
         "print(cwd)\n")
  r = _run(src, tmp_root)
  assert r.passed, r
  rundir = r.stdout.strip()
  assert os.path.basename(rundir).startswith(sandbox.RUN_PREFIX)
  assert not os.path.exists(rundir)


def test_memory_and_file_size_limits(tmp_root):
  r = _run("x = bytearray(3 << 30)\n", tmp_root, memory_mb=512)
  assert r.status == "failed" and "MemoryError" in r.result
  r = _run("with open('big', 'wb') as f:\n  f.write(b'0' * (4 << 20))\n", tmp_root, file_size_mb=1)
  assert r.status == "failed" and ("SIGXFSZ" in r.result or "File too large" in r.result), r


def test_process_limit(tmp_root):
  src = ("import os, time\n"
         "kids = []\n"
         "try:\n"
         "  for _ in range(64):\n"
         "    pid = os.fork()\n"
         "    if pid == 0:\n"
         "      time.sleep(5); os._exit(0)\n"
         "    kids.append(pid)\n"
         "except OSError:\n"
         "  raise SystemExit(f'fork refused after {len(kids)}')\n")
  r = _run(src, tmp_root, max_procs=8, timeout_s=10)
  assert r.status == "failed" and "fork refused after" in r.result, r
  assert sandbox.leaked_processes([r]) == []


def test_run_many_keeps_order(tmp_root):
  programs = [f"assert {i} % 3 != 0\n" for i in range(9)]
  results = sandbox.run_many(programs, workers=3, tmp_root=tmp_root)
  assert [r.passed for r in results] == [i % 3 != 0 for i in range(9)]


def test_leak_detector_sees_marked_and_pool_uid_processes():
  # The hostile suite's "no leaked process" checks are only as good as this detector.
  token = "leaktest" + str(os.getpid())
  procs = [subprocess.Popen(["sleep", "30"], env={sandbox.MARKER_ENV: token})]
  uid = None
  if os.geteuid() == 0:
    uid = sandbox.UID_BASE + sandbox.UID_SLOTS - 1 - os.getpid() % 100
    procs.append(subprocess.Popen(["sleep", "30"], user=uid, group=uid, env={}))
  try:
    fake = sandbox.ExecResult("failed", "", 1, "", "", 0.0, run_id=token, uid=uid)
    found = set(sandbox.leaked_processes([fake]))
    assert {p.pid for p in procs} <= found
  finally:
    for p in procs:
      p.kill()
      p.wait()
  assert sandbox.leaked_processes([fake]) == []


# ------------------------------------------------------------------ tests in their own process

ADD_TESTS = sandbox.Tests("def check(candidate):\n  assert candidate(2, 3) == 5\n"
                          "  assert candidate(10, -4) == 6\n", "add")


def test_check_mode_verdicts(tmp_root):
  cases = [
      ("def add(a, b):\n  return a + b\n", "passed", "passed"),
      ("def add(a, b):\n  return a - b\n", "failed", "failed: AssertionError"),
      ("def add(a, b):\n  raise ValueError('bad')\n", "failed", "failed: ValueError: bad"),
      ("def add(:\n", "failed", "failed: SyntaxError"),
      ("x = 1\n", "failed", "failed: KeyError: 'add'"),
      ("import os\nos._exit(0)\n", "failed", "failed: exited with code 0 before the tests"),
      ("import os\ndef add(a, b):\n  os._exit(3)\n", "failed",
       "failed: exited with code 3 before the tests"),
      ("import os, signal\ndef add(a, b):\n  os.kill(os.getpid(), signal.SIGSEGV)\n", "failed",
       "failed: killed by SIGSEGV"),
      ("import sys\ndef add(a, b):\n  sys.exit(0)\n", "failed", "failed: SystemExit: 0"),
      ("def add(a, b):\n  return float(a + b)\n", "passed", "passed"),  # 5.0 == 5, as in-process
      ("def add(a, b):\n  return (a + b for _ in [0])\n", "failed",
       "failed: TypeError: a generator"),
  ]
  results = sandbox.run_many([c[0] for c in cases], tests=[ADD_TESTS] * len(cases), workers=2,
                             tmp_root=tmp_root, timeout_s=10)
  for (src, status, detail), r in zip(cases, results):
    assert r.status == status, (src, r)
    assert r.result.startswith(detail), (src, r.result)
  assert "Traceback" in results[2].stderr and "ValueError: bad" in results[2].stderr
  assert sandbox.leaked_processes(results) == []


def test_check_mode_passes_plain_data_exactly(tmp_root):
  values = ("[None, True, 0, -1, 2 ** 200, 1.5, float('inf'), -0.0, 1+2j, 'a\\ud800',"
            " b'\\x00\\xff', (1, (2,)), [[]], {'k': (1, 2), 3: [4]}, {1, 2},"
            " frozenset({(1, 2)}), bytearray(b'x')]")
  tests = sandbox.Tests(
      f"def check(candidate):\n  values = {values}\n"
      "  for v in values:\n    got = candidate(v)\n"
      "    assert got == v and type(got) is type(v) or isinstance(v, bytearray), (got, v)\n"
      "  assert candidate([1, 2]) == [1, 2] and candidate(k=3) == 3\n", "echo")
  r = _run("def echo(x=None, k=None):\n  return x if k is None else k\n", tmp_root, tests=tests)
  assert r.passed, r


def test_tests_never_enter_the_solution_process(tmp_root):
  # The solution looks for the expected answer (a marker only the tests hold) everywhere it can:
  # its files, its own memory, its parent's /proc entries.
  marker = "expected-" + "7f3a9c"
  tests = sandbox.Tests(f"def check(candidate):\n  assert candidate() == {marker!r}\n", "guess")
  src = ("import gc, os, sys\n"
         f"marker = 'expected-' + '7f3a9c'\n"
         "seen = []\n"
         "for root, dirs, files in os.walk('.'):\n"
         "  for f in files:\n"
         "    if marker.encode() in open(os.path.join(root, f), 'rb').read():\n"
         "      seen.append('file')\n"
         "for o in gc.get_objects():\n"
         "  for v in (o.values() if isinstance(o, dict) else [o]):\n"
         "    if isinstance(v, (str, bytes)) and v is not marker and "
         "(marker in v if isinstance(v, str) else marker.encode() in v):\n"
         "      seen.append('memory')\n"
         "for name in ('cmdline', 'environ', 'mem'):\n"
         "  try:\n"
         "    if marker.encode() in open(f'/proc/{os.getppid()}/{name}', 'rb').read(1 << 20):\n"
         "      seen.append(name)\n"
         "  except OSError:\n"
         "    pass\n"
         "print('SEEN', sorted(set(seen)))\n"
         "def guess():\n  return 'no idea'\n")
  r = _run(src, tmp_root, tests=tests)
  assert r.status == "failed" and "SEEN []" in r.stdout, r


@pytest.mark.parametrize("with_tests", [False, True])
def test_ignoring_sigxcpu_is_still_a_cpu_timeout(tmp_root, with_tests):
  # The kernel SIGKILLs a process one CPU second after the SIGXCPU it ignored.
  src = ("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
         "def add(a, b):\n  while True:\n    pass\n")
  src += "" if with_tests else "add(1, 2)\n"
  r = _run(src, tmp_root, timeout_s=30.0, cpu_s=1, tests=ADD_TESTS if with_tests else None)
  assert r.status == "timed_out" and r.result == "timed out (cpu time limit)", r


def test_surrogates_in_source_and_output_give_verdicts(tmp_root):
  r = _run("x = '\ud800'\n", tmp_root)  # a lone surrogate in the source: not UTF-8
  assert r.status == "failed" and "SyntaxError" in r.result, r
  r = _run("raise ValueError('\\ud800')\n", tmp_root)
  assert r.status == "failed" and "\\ud800" in r.result, r
  r.result.encode("utf-8")
  r = _run("import sys\nsys.stdout.buffer.write(b'\\xed\\xa0\\x80\\xff')\n", tmp_root)
  assert r.passed and r.stdout == "\ufffd" * 4, r


def test_one_evaluator_error_is_one_failed_verdict(tmp_root, monkeypatch):
  from lora_jax.sandbox import rundir
  real = rundir.make_rundir

  def flaky(tmp, source, uid):
    if "boom" in source:
      raise RecursionError("maximum recursion depth exceeded")
    return real(tmp, source, uid)

  monkeypatch.setattr(rundir, "make_rundir", flaky)
  results = sandbox.run_many(["x = 'boom'\n", "x = 1\n"], workers=1, tmp_root=tmp_root)
  assert results[0].status == "failed" and "RecursionError" in results[0].result
  assert results[1].passed


def test_remove_rundir_takes_any_tree(tmp_path):
  from lora_jax.sandbox import rundir
  top = tmp_path / "run"
  top.mkdir()
  # Deeper than PATH_MAX and the recursion limit, built with directory fds.
  fd = os.open(top, os.O_RDONLY)
  for _ in range(3000):
    os.mkdir("dd", dir_fd=fd)
    nxt = os.open("dd", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    fd = nxt
  os.close(fd)
  for name in (b"\xff\xfe", b"new\nline", b"x" * 255):
    open(os.path.join(os.fsencode(top), name), "wb").close()
  os.symlink("loop_b", top / "loop_a")
  os.symlink("loop_a", top / "loop_b")
  os.symlink(str(tmp_path), top / "outside")  # must not be followed
  (tmp_path / "keep").write_text("x")
  locked = top / "locked" / "inner"
  locked.mkdir(parents=True)
  (locked / "f").write_text("x")
  os.chmod(locked, 0)
  os.chmod(top / "locked", 0)
  rundir.remove_rundir(str(top))
  assert not os.path.lexists(top) and (tmp_path / "keep").read_text() == "x"


def test_memory_budget_covers_the_whole_run(tmp_root):
  # Processes that each stay under the 512 MiB per-process limit exceed the run's 512 + 32 MiB
  # budget together: the kernel kills the largest.
  info = sandbox.sandbox_info()
  if not info["cgroup_budget"]:
    pytest.skip("no cgroup budget here: " + "; ".join(info["notes"]))
  kids = ("import os, time\nkids = []\nfor _ in range({n}):\n  pid = os.fork()\n"
          "  if pid == 0:\n    x = b'1' * ({mb} << 20)\n    time.sleep(3)\n    os._exit(0)\n"
          "  kids.append(pid)\n")
  src = kids.format(n=4, mb=200) + "print('KILLED', sum(os.waitpid(k, 0)[1] == 9 for k in kids))\n"
  r = _run(src, tmp_root, memory_mb=512, disk_mb=32, timeout_s=30.0)
  assert r.passed and int(r.stdout.split()[1]) >= 1, r
  src = kids.format(n=2, mb=150) + "time.sleep(0.5)\nx = b'1' * (400 << 20)\n"
  r = _run(src, tmp_root, memory_mb=512, disk_mb=32, timeout_s=30.0)
  assert r.result == "failed: killed by SIGKILL (out of the run's memory budget)", r
