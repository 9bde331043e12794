"""Multi-host: two processes on localhost (jax.distributed + CPU collectives) train tiny LoRA for
3 steps, each feeding its own half of the global batch, and agree with one process."""

import json
import os
import socket
import subprocess
import sys

import pytest

from _train_support import CACHE_ENV

TESTS = os.path.dirname(os.path.abspath(__file__))

_WORKER = r"""
import json, logging, sys
import jax
out_dir, port, pid, nproc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if nproc > 1:
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc,
                             process_id=pid, initialization_timeout=300)
logging.getLogger("absl").setLevel(logging.WARNING)
from lora_jax.training import train
from _train_support import StandInData, tiny_cfg
cfg = tiny_cfg(out_dir, steps=3, export="adapter")
result = train(cfg, data_iter=StandInData(8, 32, process_index=pid, process_count=nproc))
losses = [m["loss"] for m in result.metrics if "loss" in m]
print("RESULT" + json.dumps({"pid": jax.process_index(), "n": jax.process_count(),
                             "devices": jax.device_count(), "losses": losses,
                             "exports": sorted(result.exports)}), flush=True)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _result(stdout: str) -> dict:
  return json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("RESULT"))[6:])


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  worker = tmp_path / "worker.py"
  worker.write_text(_WORKER)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu", **CACHE_ENV)
  env.pop("XLA_FLAGS", None)
  # timeouts: a 3-step run with its compilations on a loaded 2-core machine takes ~1 min; a
  # hang (e.g. a collective waiting for a dead peer) fails the test instead of blocking the suite
  single = subprocess.run([sys.executable, str(worker), str(tmp_path / "one"), "0", "0", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-4000:]
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path / "two"), str(port),
                             str(i), "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=600)
      assert p.returncode == 0, stderr[-4000:]
      outs.append(_result(stdout))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  ref = _result(single.stdout)
  assert ref["n"] == 1 and all(o["n"] == 2 and o["devices"] == 2 for o in outs)
  got = next(o for o in outs if o["pid"] == 0)
  assert len(got["losses"]) == len(ref["losses"]) == 3
  # the cross-process all-reduce sums f32 partial sums in another order: equal up to rounding
  assert max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])) < 1e-5
  assert got["exports"] == ["adapter"]
  assert os.path.isfile(tmp_path / "two" / "export" / "adapter" / "adapter_config.json")
  # both processes wrote their own data-iterator state into the shared checkpoint
  data_dir = tmp_path / "two" / "checkpoints" / "3" / "data"
  assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
