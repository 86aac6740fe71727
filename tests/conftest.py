"""Shared test set-up: 8 fake CPU devices (set before any backend use) and the compile caches."""

import atexit
import os
import shutil
import tempfile

import jax

from loopjax.cli.runtime import patient_cpu_collectives, skip_absent_tpu


def compile_cache(name: str) -> str:
  """A persistent XLA compile cache directory of this pytest process.

  Under pytest-xdist each worker gets its own (suffixed with PYTEST_XDIST_WORKER): JAX writes a cache
  entry in place (`Path.write_bytes`, no rename), so a second process reading the same key can load a
  half-written executable.
  """
  worker = os.environ.get("PYTEST_XDIST_WORKER", "")
  return os.path.join(os.path.expanduser("~"), ".cache", "loopjax", f"{name}-{worker}" if worker else name)


SUBPROCESS_CACHE = compile_cache("xla-tests-subprocess")  # `--compile_cache` of the CLI runs the tests start

# lm-eval's local tasks are cached as Arrow files by `datasets` on first load: a cache of this process's own,
# so every run starts cold as CI does (a warm ~/.cache hid first-load output once) and leaves no files behind.
if "HF_DATASETS_CACHE" not in os.environ:
  os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="loopjax-tests-hf-datasets-")
  atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)

# As the CLI does: without a TPU, no TPU backend start-up in the test processes (libtpu's error lines, and its
# /tmp/libtpu_lockfile, which would make a concurrent `loopjax compile --topology` fail with ABORTED).
skip_absent_tpu()
patient_cpu_collectives()  # as the CLI does: 8 fake devices on 2 busy cores may meet a collective > 60 s apart
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", compile_cache("xla-tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# The released Ouro code's outputs on a tiny model (README.txt there says how they were made); in the repository,
# so the parity tests run (and fail, never skip) in any clone.
OURO_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "ouro_tiny_mha")
