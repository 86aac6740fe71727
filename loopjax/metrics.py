"""Peak FLOP/s of the machine (for MFU) and device metrics as Python values.

XLA's cost analysis counts a while-loop body once, so for scanned models it undercounts by the
trip counts; every FLOP figure in loopjax comes from `loopjax.model.flops_per_token` instead.
"""

import os
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


PEAK_FLOPS_ENV = "LOOPJAX_PEAK_FLOPS"


def matmul_flops_per_second(rows: int, inner: int, cols: int, dtype="float32", repeats: int = 7) -> float:
  """FLOP/s of a jitted [rows, inner] @ [inner, cols] matmul on device 0: the median of `repeats` runs.

  The median, not the best: on a shared machine the best run is luck, the median is what a step sees.
  """
  a = jnp.ones((rows, inner), dtype)
  b = jnp.ones((inner, cols), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * rows * inner * cols / float(np.median(times))


def peak_flops(cfg) -> tuple[float, str]:
  """(total peak FLOP/s of the run's devices, where the figure comes from), the denominator of MFU.

  In order: `train.peak_flops` (config), the LOOPJAX_PEAK_FLOPS environment variable, the table of
  accelerators (dense bf16 per chip), and on CPU a probe: the model's own largest layer matmul
  ([batch x seq, hidden] @ [hidden, mlp] in the compute dtype), median of several runs. Fake CPU
  devices share the host's cores, so the CPU figure is the host's, not multiplied by the devices.
  """
  if cfg.train.peak_flops > 0:
    return float(cfg.train.peak_flops), "train.peak_flops"
  if os.environ.get(PEAK_FLOPS_ENV):
    return float(os.environ[PEAK_FLOPS_ENV]), PEAK_FLOPS_ENV
  devices = jax.devices()
  if devices[0].platform == "cpu":
    m = cfg.model
    rows = min(cfg.train.batch_size * cfg.train.seq_len, 4096)
    return (matmul_flops_per_second(rows, m.hidden_size, m.mlp_dim, m.compute_dtype),
            f"measured: [{rows}, {m.hidden_size}] @ [{m.hidden_size}, {m.mlp_dim}] {m.compute_dtype} matmul, median "
            "of 7 runs")
  for name, flops in PEAK_FLOPS_PER_DEVICE.items():
    if devices[0].device_kind.startswith(name):
      return flops * len(devices), f"{name} dense bf16 peak x {len(devices)}"
  return float("nan"), f"unknown accelerator {devices[0].device_kind!r}: MFU is NaN (set train.peak_flops)"


def to_python(metrics: dict) -> dict:
  """Device arrays -> floats / lists of floats, for JSON and TensorBoard."""
  out = {}
  for key, value in jax.device_get(metrics).items():
    value = np.asarray(value)
    out[key] = value.tolist() if value.ndim else float(value)
  return out
