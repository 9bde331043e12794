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
