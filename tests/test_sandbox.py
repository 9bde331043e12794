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


def test_timeout_is_enforced_and_reported(tmp_root):
  t0 = time.monotonic()
  r = _run("import time\nwhile True:\n  time.sleep(0.01)\n", tmp_root, timeout_s=1.0)
  elapsed = time.monotonic() - t0
  assert r.status == "timed_out" and r.result == "timed out"
  assert elapsed < 6.0


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
