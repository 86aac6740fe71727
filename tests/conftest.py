"""Shared test set-up: 8 fake CPU devices (set before any backend use) and a compile cache."""

import os

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "loopjax", "xla-tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
