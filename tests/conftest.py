"""Shared test set-up: 8 fake CPU devices (set before any backend use), a compile cache, xdist workers."""

import os

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "loopjax", "xla-tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pyproject addopts): one worker per core, at most 4. Most of a test's time is XLA compiling
  on one thread, so two workers on CI's 2 cores nearly halve the suite; each worker holds its own JAX
  runtime and compiled fixtures (~1-2 GB), hence the cap. `-n 0` runs everything in this process."""
  return max(1, min(os.cpu_count() or 1, 4))
