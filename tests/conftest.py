"""Shared test setup: CPU only, quiet logs, and a persistent XLA compile cache.

Many tests compile the same tiny-model functions; the persistent cache turns those identical
recompilations (seconds each on a 2-core CPU) into disk reads, in this process and in the
subprocesses tests start (they inherit the environment).
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "lora_jax_test_compile_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
  """One GCS emulator for the session (tests/_gcs_support.py), every client pointed at it; tests
  write under their own prefix (`gcs_emulator.url()`). Stopped at the end of the session."""
  from _gcs_support import GcsEmulator, reset_clients
  emu = GcsEmulator(str(tmp_path_factory.mktemp("gcs"))).start()
  saved = {k: os.environ.get(k) for k in emu.env()}
  os.environ.update(emu.env())
  reset_clients()
  try:
    yield emu
  finally:
    emu.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    reset_clients()


@pytest.fixture
def gcs_url(gcs_emulator):
  """A fresh gs:// prefix in the emulator's bucket."""
  return gcs_emulator.url()
