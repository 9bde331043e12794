"""Run untrusted Python programs (model completions + unit tests) and decide pass / fail / timeout.

Every program runs in a fresh `python -I` process, in its own temporary directory (cwd, HOME and
TMPDIR), its own session, with stdin closed, a scrubbed environment, captured and size-capped
stdout/stderr, and rlimits on address space, CPU time, file size, open files and processes.
Where the OS allows it, a small launcher (started with the evaluator's interpreter) also puts the
run into its own cgroup (whole-run memory and process budget), into new network / PID / mount /
IPC namespaces with every filesystem read-only, empty private /tmp, /var/tmp, /run and /dev/shm,
and the run directory on a size-limited tmpfs, forbids nested user namespaces, and, when the
evaluator runs as root, switches to a per-run unprivileged uid (so RLIMIT_NPROC binds and every
process the program leaves behind can be found and killed by uid). `sandbox_info()` says which of
these protections are active; `run_program` refuses to run with fewer protections than the first
probe found (no silent downgrade mid-evaluation).

With `Tests`, the tests run in a process of their own that the program cannot reach, calling the
program's entry point across a socket with plain data: the program cannot forge the verdict
(wrapper.py explains how).

Modules: `probe` (which protections this machine allows), `run` (one program: launcher, pipes,
cleanup, verdict), `process` (uid leases, finding and killing a run's processes), `cgroup` (the
run's cgroup), `rundir` (the per-run directory), `launcher` and `wrapper` (the code that runs
inside the sandbox), `result` (ExecResult). This module holds the entry points, `run_program`
and `run_many`.
"""

from __future__ import annotations

import concurrent.futures
from typing import Iterable, Sequence

from lora_jax.sandbox.probe import PROTECTIONS, sandbox_info
from lora_jax.sandbox.process import MARKER_ENV, UID_BASE, UID_SLOTS, leaked_processes
from lora_jax.sandbox.result import STATUSES, ExecResult, SandboxError
from lora_jax.sandbox.run import Tests, execute
from lora_jax.sandbox.rundir import RUN_PREFIX


def run_program(source: str, *, tests: Tests | None = None, timeout_s: float = 10.0,
                memory_mb: int = 1024, cpu_s: float | None = None, max_procs: int = 32,
                max_open_files: int = 128, file_size_mb: int = 16, disk_mb: int = 64,
                output_limit: int = 1 << 16, tmp_root: str | None = None,
                nice: int = 0) -> ExecResult:
  """Run one program in the sandbox and give the verdict.

  Without `tests`: "passed" if the program ran to the end without an exception (code in the
  program's own process can forge this). With `tests`: "passed" if `tests.source`'s
  `check(candidate)`, run in a process the program cannot reach, returned normally, calling the
  program's `tests.entry_point` (see `Tests`); this verdict cannot be forged from the program.

  `timeout_s` is the wall-clock limit (launcher start-up included); `cpu_s` the CPU-time rlimit
  in seconds, rounded up (default: timeout_s rounded up, plus 1); `memory_mb` the address-space
  rlimit per process, and with `disk_mb` the whole run's memory budget (where
  `sandbox_info()["cgroup_budget"]`); `max_procs` the process/thread rlimit (for the per-run uid
  when root, else on top of the user's current count; also the run's cgroup budget);
  `file_size_mb` the largest file it may write; `disk_mb` what all its files together may take
  (where `sandbox_info()["disk_budget"]`); `output_limit` the bytes of stdout/stderr kept.
  `tmp_root` is where the per-run directory is made (default: the system temp dir; it must be
  traversable by other users when the evaluator runs as root).
  `nice` > 0 lowers the program's CPU priority (kinder to other jobs on a shared machine).
  An evaluator error on one program (not a `SandboxError`) is that program's "failed" verdict.
  """
  info = sandbox_info()
  plan = {"uid_switch": info["uid_switch"], "python": info["python"],
          "namespaces": info["namespaces_enabled"], "cgroup": info["cgroup_budget"],
          "require": {k: info[k] for k in PROTECTIONS if k != "uid_switch"}}
  try:
    res, _ = execute(source, plan, timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu_s,
                     max_procs=max_procs, max_open_files=max_open_files,
                     file_size_mb=file_size_mb, disk_mb=disk_mb, output_limit=output_limit,
                     tmp_root=tmp_root, nice=nice, tests=tests)
  except SandboxError:
    raise
  except Exception as e:  # noqa: BLE001 -- one program must not end a whole evaluation
    detail = f"failed: sandbox could not run this program: {type(e).__name__}: {e}"
    return ExecResult("failed", detail.encode("utf-8", "backslashreplace").decode(), None, "", "",
                      0.0)
  return res


def run_many(programs: Iterable[str], *, tests: Sequence[Tests | None] | None = None,
             workers: int = 2, **kwargs) -> list[ExecResult]:
  """`run_program` over many programs (with `tests[i]` for program i, if given) with `workers` in
  parallel; results in input order."""
  programs = list(programs)
  tests = list(tests) if tests is not None else [None] * len(programs)
  if len(tests) != len(programs):
    raise ValueError(f"{len(tests)} tests for {len(programs)} programs")
  sandbox_info()  # probe once, before the threads start
  jobs = list(zip(programs, tests))
  if workers <= 1:
    return [run_program(p, tests=t, **kwargs) for p, t in jobs]
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(lambda job: run_program(job[0], tests=job[1], **kwargs), jobs))


__all__ = ["ExecResult", "SandboxError", "Tests", "run_program", "run_many", "sandbox_info",
           "leaked_processes", "STATUSES", "MARKER_ENV", "RUN_PREFIX", "UID_BASE", "UID_SLOTS"]
