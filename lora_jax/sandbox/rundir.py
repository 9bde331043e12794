"""The per-run directory: where it is made, whether another uid can reach it, how it is removed."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile

from lora_jax.sandbox.result import SandboxError

RUN_PREFIX = "lora_jax_sbx_"


def other_can_use(path: str) -> bool:
  """Whether a uid with no group in common could execute `path` (all parents o+x, file o+rx)."""
  real = os.path.realpath(path)
  try:
    return ((os.stat(real).st_mode & 0o005) == 0o005 and
            other_can_traverse(os.path.dirname(real)))
  except OSError:
    return False


def other_can_traverse(path: str) -> bool:
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


def make_rundir(tmp_root: str, source: str, uid: int | None) -> str:
  """A fresh run dir under `tmp_root` holding main.py (= `source`) and tmp/, owned by `uid`.

  Lone surrogates in `source` are written as they are (invalid UTF-8): the program then fails to
  compile, which is its verdict, instead of the evaluator failing to write it.
  """
  rundir = tempfile.mkdtemp(prefix=RUN_PREFIX, dir=tmp_root)
  with open(os.path.join(rundir, "main.py"), "w", encoding="utf-8", errors="surrogatepass") as f:
    f.write(source)
  os.mkdir(os.path.join(rundir, "tmp"))
  if uid is not None:
    for p in (rundir, os.path.join(rundir, "tmp"), os.path.join(rundir, "main.py")):
      os.chown(p, uid, uid)
  return rundir


def remove_rundir(path: str) -> None:
  """Remove a run dir whatever the program left in it: directories chmod-ed to 000, trees deeper
  than PATH_MAX or the recursion limit, symlink loops, undecodable names. Never follows links.

  shutil.rmtree recurses per level, so deep trees go to coreutils (`chmod -R`, `rm -rf`), which
  walk with directory fds at any depth.
  """
  for _ in range(3):
    if not os.path.lexists(path):
      return
    try:
      shutil.rmtree(path)
      return
    except (OSError, RecursionError):
      pass
    for cmd in (["chmod", "-R", "u+rwx", "--", path],
                ["rm", "-rf", "--one-file-system", "--", path]):
      subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, check=False)
  if os.path.lexists(path):
    raise SandboxError(f"could not remove sandbox directory {path}")


def readonly_checks(tmp_root: str) -> list[str]:
  """Paths that must be read-only inside the sandbox for `readonly_fs` to be reported."""
  paths = {"/", "/tmp", "/var/tmp", tmp_root, os.path.expanduser("~"),
           os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  try:
    paths.add(os.getcwd())
  except OSError:
    pass
  return sorted(paths)
