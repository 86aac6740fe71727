"""FLOP accounting (loop-aware), MFU, and the metric writers (jsonl + TensorBoard).

XLA's cost analysis counts a while-loop body once, so for scanned models it undercounts by the
trip counts; every FLOP figure in loopjax comes from `train_flops_per_token` instead.
"""

import json
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


def matmul_params_per_step(m) -> int:
  """Ouro parameters used in matmuls by one loop step: the stack, the LM head and the gate."""
  D, F, V = m.hidden_size, m.mlp_dim, m.vocab_size
  attn = D * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
  return m.num_layers * (attn + 3 * D * F) + D * V + D


def train_flops_per_token(m, seq_len: int) -> float:
  """Training FLOPs per token: 6 x matmul params x T, plus causal attention (QK^T and AV).

  Ouro runs the L-layer stack, the LM head and the gate at each of the T steps. Causal attention
  per layer costs 2 matmuls x 2 FLOPs x (S/2 keys on average) x N*H per token forward, x3 for training.
  Loop-Residual: prelude and coda once, the looped block T times, the head once.
  """
  attn_per_layer = 6 * seq_len * m.num_heads * m.head_dim  # = 3 x (2 x 2 x S/2 x N H)
  if m.kind == "ouro":
    return m.loop_steps * (6 * matmul_params_per_step(m) + m.num_layers * attn_per_layer)
  D, F = m.hidden_size, m.mlp_dim
  layer = 6 * (4 * D * D + 2 * D * F) + attn_per_layer
  return layer * (m.loop_steps * m.num_layers + m.prelude_layers + m.coda_layers) + 6 * D * m.vocab_size


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


class MetricWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard.

  Only the writing process (process 0) opens files; others get a writer that drops everything.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    for key, value in metrics.items():
      if isinstance(value, list):
        for i, v in enumerate(value):
          self._tb.add_scalar(f"{key}/{i + 1}", v, step)
      elif isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
