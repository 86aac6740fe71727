"""Shared pieces of the benchmarks: configs, a synthetic batch, the real jitted train step, tables.

Benchmarks time `loopjax.train.trainer.build_trainer(...).train_step`, the exact step
`loopjax train` runs, on one host device mesh, with a fixed random batch (one full-length document
per row, so the attention mask is plainly causal). Data loading is not timed.
"""

import importlib.util
import os
import statistics
import time

import jax
import numpy as np

from loopjax import metrics as metrics_lib
from loopjax.train import state as state_lib
from loopjax.train.driver import global_batch
from loopjax.train.trainer import build_trainer, make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
  """configs/<name>.py -> its config; "peer" is the model shape of the peer figures in NOTES-stack.md."""
  if name == "peer":
    return peer_config()
  path = name if name.endswith(".py") else os.path.join(REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"bench_cfg_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def peer_config():
  """D 256, 8 heads, MLP 688, vocab 4096, seq 256, batch 8, fp32, 4 layers, T 4 (MaxText / Ouro PyTorch runs)."""
  c = load_config("small")
  m = c.model
  m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads = 4096, 256, 4, 8, 8
  m.head_dim, m.mlp_dim, m.loop_steps = 32, 688, 4
  c.train.batch_size, c.train.seq_len = 8, 256
  return c


def with_model(cfg, **model_fields):
  """A copy of `cfg` with model fields replaced (e.g. loop_steps=8, remat="none")."""
  cfg = cfg.copy_and_resolve_references()
  for key, value in model_fields.items():
    cfg.model[key] = value
  return cfg


def with_overrides(cfg, overrides):
  """`cfg` with model fields set from "name=value" strings (`--set`), each value parsed as the field's type."""
  fields = dict(s.split("=", 1) for s in overrides)
  parse = lambda key, v: v.lower() in ("1", "true") if isinstance(cfg.model[key], bool) else type(cfg.model[key])(v)
  return with_model(cfg, **{key: parse(key, v) for key, v in fields.items()})


def synthetic_batch(cfg, seed: int = 0) -> dict:
  """One global batch of random tokens; every row a single document covering the whole sequence."""
  rng = np.random.default_rng(seed)
  b, s, v = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
  tokens = rng.integers(0, v, (b, s + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((b, s), np.float32),
          "segment_ids": np.ones((b, s), np.int32),
          "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()}


class Bench:
  """The parts of a training setup that do not depend on T or the remat policy: mesh, state, batch.

  devices: the mesh's devices (default: all), e.g. the first one of several fake CPU devices.
  """

  def __init__(self, cfg, init_state: bool = True, devices=None):
    self.cfg = cfg
    self.mesh = make_mesh(cfg, devices)
    trainer = build_trainer(cfg, self.mesh)
    self.num_params = state_lib.count_params(cfg.model)
    self.state = trainer.init_state() if init_state else None
    self.abstract = trainer.abstract_state
    self.batch = global_batch(synthetic_batch(cfg), self.mesh)

  def jitted_step(self, cfg):
    """The real jitted train step for `cfg` (same shapes of state and batch as self.cfg)."""
    return build_trainer(cfg, self.mesh).train_step

  def compile(self, cfg, state=None):
    """(compiled step, lower seconds, compile seconds) of the train step for `cfg`."""
    state = self.abstract if state is None else state
    with jax.set_mesh(self.mesh):
      start = time.perf_counter()
      lowered = self.jitted_step(cfg).lower(state, self.batch)
      lowered_at = time.perf_counter()
      compiled = lowered.compile()
      done = time.perf_counter()
    return compiled, lowered_at - start, done - lowered_at

  def fresh_state(self):
    """A copy of the initial state (steps donate their input state, so every run needs its own)."""
    return jax.tree.map(lambda x: x.copy(), self.state)


def time_steps(compiled, state, batch, steps: int):
  """(state, wall s/step, CPU s/step) over `steps` steps, blocking once at the end.

  CPU time is this process's (all threads): on a shared machine it is far less noisy than wall
  time, which also counts the time our threads wait for a core.
  """
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  return state, (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def matmul_peak() -> float:
  """XLA's float32 matmul FLOP/s now, on device 0: the better of 1024^3 and 2048^3, median of 5 runs each.

  On these shared VMs it moves 1.5x within an hour, so benchmarks take it again every round.
  """
  return max(metrics_lib.matmul_flops_per_second(n, n, n, repeats=5) for n in (1024, 2048))


def median(xs):
  return statistics.median(xs)


def spread(xs) -> str:
  """min-max of the repeats as a percentage of the median: how noisy a cell was."""
  return f"{100 * (max(xs) - min(xs)) / median(xs):.0f}%"


def print_table(title: str, headers, rows):
  """A Markdown table (pastes straight into BENCHMARKS.md)."""
  print(f"\n### {title}\n")
  print("| " + " | ".join(headers) + " |")
  print("|" + "|".join("---:" for _ in headers) + "|")
  for row in rows:
    print("| " + " | ".join(str(c) for c in row) + " |")
  print(flush=True)


def machine_line() -> str:
  d = jax.devices()[0]
  return (f"jax {jax.__version__}, {jax.device_count()} {d.platform} device(s) ({d.device_kind}), "
          f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}")
