"""The native CPU attention core: `native/attention_cpu.cc` through the XLA FFI, with its own backward.

Why (issue 11): on 2 CPU cores the pure-JAX blocked core spends most of its time between its block
matmuls; one fused C++ pass per (row, head) keeps the scores in cache and runs 2-3x faster
(BENCHMARKS.md). It is exact (float32, an exact softmax over each query block's reach) and
deterministic (fixed summation order whatever the thread count).

The library is compiled on first use with the host's C++ compiler (`$CXX`, default g++; -O3
-march=native) into `$LOOPJAX_NATIVE_CACHE` (default ~/.cache/loopjax/native), under a name keyed by
the source, the jaxlib version, the compiler's version and flags and the CPU's flags, and written
atomically (a temporary file renamed into place) so that no process loads a half-written one. Several
processes starting at once (`launch/local.sh`, one per GPU) build it once: the build holds an flock on
the name's `.lock` file, and the others wait for it and load its result; a `.partial` file left by a
killed build is removed by the next build.
`problem()` says why it cannot be used (no compiler, a failed build); `attention.resolve` then falls
back to blocked for `auto`, and an explicit `model.attention=native` fails at start-up.

float32 only: other compute dtypes are cast to float32 around the call (float64 runs, which check
numerics, are resolved to blocked instead).
"""

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

log = logging.getLogger("loopjax")

SOURCE = pathlib.Path(__file__).parent / "native" / "attention_cpu.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
TARGETS = {"loopjax_attention_forward": "LoopjaxAttentionForward",
           "loopjax_attention_backward": "LoopjaxAttentionBackward"}


def _cpu_flags() -> str:
  """What -march=native compiles for: the CPU's flags line (Linux), else the machine's name."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line
  except OSError:
    pass
  return platform.machine() + platform.processor()


def library_path(compiler: str) -> pathlib.Path:
  """Where the library built by `compiler` for this source, jaxlib and CPU is cached (built or not)."""
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
  key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), jax.lib.__version__.encode(), version.encode(),
                                   " ".join(FLAGS).encode(), _cpu_flags().encode()])).hexdigest()[:16]
  cache = pathlib.Path(os.environ.get("LOOPJAX_NATIVE_CACHE", "~/.cache/loopjax/native")).expanduser()
  return cache / f"attention_cpu-{key}.so"


def _compile(compiler: str) -> pathlib.Path:
  """The built library (built now unless the cache has it); RuntimeError with the compiler's output."""
  library = library_path(compiler)
  cache = library.parent
  if library.exists():
    return library
  cache.mkdir(parents=True, exist_ok=True)
  with open(cache / f"{library.name}.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
    if library.exists():  # another process built it while this one waited
      return library
    for stale in cache.glob(f"{library.name}*.partial"):  # a killed build's: nobody else builds this key now
      stale.unlink(missing_ok=True)
    fd, partial = tempfile.mkstemp(dir=cache, prefix=library.name, suffix=".partial")
    os.close(fd)
    command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", partial]
    began = time.perf_counter()
    built = subprocess.run(command, capture_output=True, text=True)  # XLA's headers print warnings
    if built.returncode:
      os.unlink(partial)
      raise RuntimeError(f"{' '.join(command)} failed:\n{built.stderr[-2000:]}")
    os.replace(partial, library)
  log.info("native attention: built %s in %.1f s", library, time.perf_counter() - began)
  return library


@functools.cache
def _load() -> str:
  """Builds and registers the FFI targets once per process; "" on success, else what went wrong."""
  compiler = os.environ.get("CXX", "g++")
  if shutil.which(compiler) is None:
    return f"no C++ compiler ({compiler!r} is not on PATH; set $CXX or install g++)"
  try:
    handle = ctypes.cdll.LoadLibrary(str(_compile(compiler)))
  except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
    return f"building {SOURCE.name} failed: {error}"
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu")
  return ""


def problem() -> str:
  """Why the native core cannot run in this process ("" if it can); builds it on the first call."""
  return _load()


def _call(target: str, results, *args):
  if problem():
    raise RuntimeError(f"native attention: {problem()}")
  return jax.ffi.ffi_call(target, results, vmap_method="sequential")(*args)


def _forward(q_BQNH, k_BSKH, v_BSKH, seg_BS, starts_P):
  B, Q, N, _ = q_BQNH.shape
  results = (jax.ShapeDtypeStruct(q_BQNH.shape, jnp.float32), jax.ShapeDtypeStruct((B, N, Q), jnp.float32))
  out_BQNH, lse_BNQ = _call("loopjax_attention_forward", results, q_BQNH, k_BSKH, v_BSKH, seg_BS, starts_P)
  # Named like the blocked core's residuals, so remat="save_attention_core" keeps them.
  out_BQNH, lse_BNQ = checkpoint_name(out_BQNH, "attention_core"), checkpoint_name(lse_BNQ, "attention_core")
  return out_BQNH, (q_BQNH, k_BSKH, v_BSKH, seg_BS, starts_P, out_BQNH, lse_BNQ)


def _backward(residuals, dout_BQNH):
  q_BQNH, k_BSKH, v_BSKH = residuals[:3]
  results = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q_BQNH, k_BSKH, v_BSKH))
  dq, dk, dv = _call("loopjax_attention_backward", results, *residuals, dout_BQNH.astype(jnp.float32))
  return dq, dk, dv, None, None


@jax.custom_vjp
def _attention(q_BQNH, k_BSKH, v_BSKH, seg_BS, starts_P):
  return _forward(q_BQNH, k_BSKH, v_BSKH, seg_BS, starts_P)[0]


_attention.defvjp(_forward, _backward)


def native_attention(q_BQNH, k_BSKH, v_BSKH, seg_BS, starts_P) -> jax.Array:
  """softmax(q k^T / sqrt(H)) v, causal and within documents, on one device's arrays (as
  `per_shard.run` passes them): the queries are P equal pieces of the keys' sequence, piece p starting
  at position starts_P[p] (int32; [0] when q is the whole sequence); segment ids are the keys' (int32).
  Computed in float32, returned in q's dtype."""
  q, k, v = (x.astype(jnp.float32) for x in (q_BQNH, k_BSKH, v_BSKH))
  return _attention(q, k, v, seg_BS, starts_P.astype(jnp.int32)).astype(q_BQNH.dtype)
