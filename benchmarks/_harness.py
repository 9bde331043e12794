"""Shared by the benchmarks: contenders timed in turns inside worker subprocesses, machine facts,
Markdown tables and JSON output.

A worker is a subprocess (one per framework, so no library's threads or allocator disturb
another's) that builds its contenders, warms them up, then waits for orders on stdin. The parent
asks the workers in turns (A, B, C, A, B, C, ... with the order rotated every round), so a load
spike on this shared machine hits every contender alike; each answer carries the wall time and
the worker's process CPU time (all threads) of one run. Medians are reported.

Protocol lines on the worker's stdout start with "@@ " and hold one JSON object; everything else
the worker or its libraries print goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

MARK = "@@ "


# --------------------------------------------------------------------------- worker side
class Channel:
  """The worker's end: protocol lines go to the real stdout; `print` goes to stderr."""

  def __init__(self):
    self._out = sys.stdout
    sys.stdout = sys.stderr

  def send(self, obj: dict) -> None:
    self._out.write(MARK + json.dumps(obj) + "\n")
    self._out.flush()


def timed(fn: Callable[[], Any]) -> dict:
  """Wall and process CPU seconds of one call (`fn` must block until its work is done)."""
  w, c = time.perf_counter(), time.process_time()
  fn()
  return {"wall": time.perf_counter() - w, "cpu": time.process_time() - c}


def serve(contenders: dict[str, Callable[[], Any]], info: dict, warmup: int = 2,
          calls: dict[str, Callable[[], Any]] | None = None) -> None:
  """Worker main loop: warm every contender up, report `info`, then run orders until "quit".

  `calls` are untimed functions the parent may ask for (e.g. a compile count at the end)."""
  ch = Channel()
  try:
    for name, fn in contenders.items():
      t = time.perf_counter()
      for _ in range(warmup):
        fn()
      info.setdefault("warmup_s", {})[name] = time.perf_counter() - t
  except Exception as e:  # noqa: BLE001 - the parent prints it and goes on without this worker
    ch.send({"error": f"{type(e).__name__}: {e}"})
    raise
  ch.send({"ready": sorted(contenders), "info": info})
  for line in sys.stdin:
    msg = json.loads(line)
    if msg["op"] == "quit":
      break
    if msg["op"] == "run":
      ch.send(timed(contenders[msg["name"]]))
    elif msg["op"] == "call":  # a named function returning JSON (e.g. a final measurement)
      ch.send({"result": (calls or {})[msg["name"]]()})


# --------------------------------------------------------------------------- parent side
class Worker:
  def __init__(self, argv: list[str], name: str, env: dict | None = None):
    self.name = name
    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 bufsize=1, env={**os.environ, **(env or {})})
    self.info: dict = {}
    self.contenders: list[str] = []
    ready = self._read()
    if "error" in ready:
      raise RuntimeError(f"worker {name} failed: {ready['error']}")
    self.info, self.contenders = ready["info"], ready["ready"]

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(MARK):
        return json.loads(line[len(MARK):])
    raise RuntimeError(f"worker {self.name} exited (code {self.proc.wait()})")

  def run(self, name: str) -> dict:
    self.proc.stdin.write(json.dumps({"op": "run", "name": name}) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def call(self, name: str) -> Any:
    self.proc.stdin.write(json.dumps({"op": "call", "name": name}) + "\n")
    self.proc.stdin.flush()
    return self._read()["result"]

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.flush()
      except BrokenPipeError:
        pass
      self.proc.wait(timeout=60)


def start_worker(script: str, kind: str, args: list[str], env: dict | None = None) -> Worker | None:
  """A worker running `script --worker kind args...`, or None (with a message) if it fails."""
  argv = [sys.executable, script, "--worker", kind, *args]
  print(f"starting {kind} worker (build + compile + warm-up)...", flush=True)
  t = time.perf_counter()
  try:
    w = Worker(argv, kind, env)
  except RuntimeError as e:
    print(f"  {kind}: {e}; skipped", flush=True)
    return None
  print(f"  {kind} ready in {time.perf_counter() - t:.0f}s: {', '.join(w.contenders)}", flush=True)
  return w


def interleave(pairs: list[tuple[Worker, str]], rounds: int, progress: bool = True
               ) -> dict[str, list[dict]]:
  """Runs every (worker, contender) once per round, rotating the order each round."""
  out: dict[str, list[dict]] = {name: [] for _, name in pairs}
  for r in range(rounds):
    k = r % len(pairs)
    for w, name in pairs[k:] + pairs[:k]:
      out[name].append(w.run(name))
    if progress:
      last = ", ".join(f"{n} {out[n][-1]['wall']:.2f}s" for _, n in pairs)
      print(f"  round {r + 1}/{rounds}: {last}", flush=True)
  return out


def summarize(samples: list[dict]) -> dict:
  walls, cpus = [s["wall"] for s in samples], [s["cpu"] for s in samples]
  return {"n": len(samples), "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
          "wall_min_s": min(walls), "wall_max_s": max(walls), "samples": samples}


# --------------------------------------------------------------------------- reporting
def machine_info() -> dict:
  model = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "host_cpu": model, "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "platform": platform.platform(), "loadavg_start": list(os.getloadavg()),
          "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def finish(result: dict, lines: list[str], out: str) -> None:
  """Prints the table lines and writes `result` as JSON (atomically)."""
  result["machine"]["loadavg_end"] = list(os.getloadavg())
  print("\n".join(lines), flush=True)
  if os.path.dirname(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, out)
  print(f"\nwrote {out}")


def load_line(m: dict) -> str:
  a, b = m["loadavg_start"], m.get("loadavg_end", ["?"] * 3)
  return (f"{m['date']}, {m['host_cpu']}, {m['cpu_count']} CPUs; 1-min load average "
          f"{a[0]:.1f} at start, {b[0] if isinstance(b[0], str) else f'{b[0]:.1f}'} at end")


# --------------------------------------------------------------------------- torch contenders
TORCH_STACK = ("torch", "transformers", "peft")  # the `interop` extra


def have_modules(*names: str) -> bool:
  """True when every module is importable (without importing it)."""
  return all(importlib.util.find_spec(n) for n in names)


def add_torch_arguments(p: argparse.ArgumentParser) -> None:
  """--no-torch and --torch-threads, shared by the benchmarks that time HF / PEFT."""
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--torch-threads", default="",
                 help="torch thread counts to time, e.g. 1,2 (default: 1 and torch's default); "
                      "ratios use the fastest. On a loaded machine torch's OpenMP threads "
                      "spin-wait for descheduled peers: 1 thread can be several times faster")


def requested_threads(text: str) -> list[int]:
  """--torch-threads as a list (empty: the worker's default, see `torch_thread_counts`)."""
  return [int(t) for t in text.split(",") if t]


def torch_thread_counts(requested: list[int]) -> list[int]:
  """The thread counts a torch worker times: `requested`, or 1 and torch's default."""
  import torch
  return sorted(set(requested or [1, torch.get_num_threads()]))


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
  """The hidden --worker / --spec a benchmark script passes to itself (see `start_worker`)."""
  p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  p.add_argument("--spec", help=argparse.SUPPRESS)


def run_worker(args: argparse.Namespace, workers: dict[str, Callable[[dict], None]]) -> bool:
  """In a worker process (args.worker set): runs that worker on its spec and returns True."""
  if not args.worker:
    return False
  workers[args.worker](json.loads(args.spec))
  return True
