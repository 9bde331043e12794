"""A local GCS for tests: the gcp-storage-emulator (the GCS JSON API on 127.0.0.1) in a
subprocess (started through tests/_gcs_emulator.py), with every client pointed at it.

`GcsEmulator(root)` stores its objects on disk under `root` (so `stop()` then `start()` keeps
them: the network-fault tests kill it mid-save). `env()` is what a process needs to talk to it:
  STORAGE_EMULATOR_HOST         gcsfs (fsspec, etils.epath, orbax's small files) and google libs
  FSSPEC_GCS_TOKEN=anon         gcsfs without credentials (else it probes the metadata server)
  TENSORSTORE_GCS_HTTP_URL      tensorstore's gcs kvstore (orbax's arrays)
  GOOGLE_AUTH_TOKEN_FOR_TESTING tensorstore without credentials
Nothing here reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

BUCKET = "lora-jax-test"  # GCS bucket names need 3+ characters (tensorstore checks)
# The emulator's command line, with the download header tensorstore needs (see that file).
_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_gcs_emulator.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsEmulator:
  """The emulator serving bucket `BUCKET` on 127.0.0.1:`port`, objects kept under `root`."""

  def __init__(self, root: str, port: int | None = None, bucket: str = BUCKET):
    self.root, self.port, self.bucket = root, port or free_port(), bucket
    self.proc: subprocess.Popen | None = None
    os.makedirs(root, exist_ok=True)

  @property
  def host(self) -> str:
    return f"http://127.0.0.1:{self.port}"

  def env(self) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": self.host, "FSSPEC_GCS_TOKEN": "anon",
            "TENSORSTORE_GCS_HTTP_URL": self.host, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}

  def url(self, *parts: str) -> str:
    """gs://BUCKET/<parts>, or a fresh unique prefix when no parts are given."""
    return "gs://" + "/".join([self.bucket, *(parts or (uuid.uuid4().hex[:12],))])

  def start(self, timeout: float = 30.0) -> "GcsEmulator":
    self.proc = subprocess.Popen(
        [sys.executable, _LAUNCHER, "start", "--host", "127.0.0.1", "--port", str(self.port),
         "--default-bucket", self.bucket, "-q"],
        cwd=self.root, stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.root, "log"), "a"),
        start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"gcp-storage-emulator exited ({self.proc.returncode}); see "
                           f"{self.root}/log")
      try:
        socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        return self
      except OSError:
        time.sleep(0.1)
    self.stop()
    raise RuntimeError(f"gcp-storage-emulator did not listen on port {self.port} in {timeout}s")

  def stop(self) -> None:
    """Kills the server at once (a network fault for its clients); the stored objects stay."""
    if self.proc is not None and self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait(10)
    self.proc = None


def reset_clients() -> None:
  """Forgets cached gcsfs clients (they keep the endpoint they were made with)."""
  import gcsfs
  gcsfs.GCSFileSystem.clear_instance_cache()


def local_gs_dirs(root: str) -> list[str]:
  """Directories named like a URL scheme (`gs:`) under `root`: a path handled as local."""
  return [os.path.join(d, n) for d, dirs, _ in os.walk(root) for n in dirs if n.endswith(":")]
