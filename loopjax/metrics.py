"""Peak FLOP/s of the machine (for MFU) and device metrics as Python values.

XLA's cost analysis counts a while-loop body once, so for scanned models it undercounts by the
trip counts; every FLOP figure in loopjax comes from `loopjax.model.flops_per_token` instead.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per device (per chip for TPUs) for known accelerators.


PEAK_FLOPS_PER_DEVICE = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA B200": 2250e12,
}


_measured_cpu_peak: float | None = None


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 8) -> float:
  """The host's float32 matmul FLOP/s, measured once by a short jitted matmul (on device 0)."""
  global _measured_cpu_peak
  if _measured_cpu_peak is None:
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      matmul(a).block_until_ready()
      best = min(best, time.perf_counter() - start)
    _measured_cpu_peak = 2 * size**3 / best
  return _measured_cpu_peak


def peak_flops(devices=None) -> float:
  """Total peak FLOP/s of `devices`: the table for accelerators; for CPU the measured host peak.

  Fake CPU devices share the host's cores, so the CPU peak is the host's, not per device.
  """
  devices = jax.devices() if devices is None else devices
  kind = devices[0].device_kind
  if devices[0].platform == "cpu":
    return measure_cpu_peak_flops()
  for name, flops in PEAK_FLOPS_PER_DEVICE.items():
    if kind.startswith(name):
      return flops * len(devices)
  return float("nan")  # unknown accelerator: MFU is reported as NaN rather than guessed


def to_python(metrics: dict) -> dict:
  """Device arrays -> floats / lists of floats, for JSON and TensorBoard."""
  out = {}
  for key, value in jax.device_get(metrics).items():
    value = np.asarray(value)
    out[key] = value.tolist() if value.ndim else float(value)
  return out
