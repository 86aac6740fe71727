"""Checkpoint cost: save (blocking part and until on disk), restore, bytes on disk, and the train-step
time while an async save is in flight vs without, for the smoke model and the small config (21M, T=4;
issue #11's goal: the step with a save in flight within 1.10x of the step without).

  python bench/bench_checkpoint.py [--steps 6]

One host device; the real jitted train step (bench.common), the real loopjax.checkpoint.Checkpointer.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Bench, load_config, median  # noqa: E402

from loopjax import checkpoint as ck  # noqa: E402


def models():
  smoke = load_config("smoke")
  return [("smoke", smoke), ("small", load_config("small"))]


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def measure(name, cfg, steps: int, root: str) -> dict:
  bench = Bench(cfg)
  compiled, _, _ = bench.compile(cfg)
  state = bench.fresh_state()
  with jax.set_mesh(bench.mesh):
    for _ in range(2):  # warm up
      state, metrics = compiled(state, bench.batch)
    jax.block_until_ready(state)
    directory = os.path.join(root, name.split()[0], "checkpoints")
    saver = ck.Checkpointer(directory, keep=100)
    items = lambda s: {"params": s.params, "opt_state": s.opt_state}
    saver.save(0, items(state), meta={"phase": "bench"})  # first save pays one-off set-up
    saver.wait()
    blocking, total = [], []
    for step in (1, 2, 3):
      start = time.perf_counter()
      saver.save(step, items(state), meta={"phase": "bench"})
      blocking.append(time.perf_counter() - start)
      saver.wait()
      total.append(time.perf_counter() - start)
    size = _dir_bytes(os.path.join(directory, "3"))
    target = {"params": bench.abstract.params, "opt_state": bench.abstract.opt_state}
    restore = []
    for step in (1, 2, 3):
      start = time.perf_counter()
      jax.block_until_ready(saver.restore(step, target).items)
      restore.append(time.perf_counter() - start)

    def step_times(with_save: bool, state):
      times, step_id = [], 10
      for _ in range(steps):
        if with_save:
          saver.wait()
          step_id += 1
          saver.save(step_id, items(state), meta={"phase": "bench"})  # returns with the write in flight
        start = time.perf_counter()
        state, metrics = compiled(state, bench.batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
      return state, median(times)

    state, plain = step_times(False, state)
    state, during = step_times(True, state)
    saver.wait()
    saver.close()
  return {"model": name, "params": bench.num_params, "bytes": size, "save_block": median(blocking),
          "save_total": median(total), "restore": median(restore), "step": plain, "step_saving": during}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=6, help="train steps timed per condition")
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix="bench_ckpt_")
  try:
    rows = [measure(name, cfg, args.steps, root) for name, cfg in models()]
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(f"\n{jax.devices()[0].device_kind} x{jax.device_count()}, medians")
  print(f"{'model':18} {'params':>11} {'on disk':>9} {'save blocks':>11} {'save total':>10} {'restore':>8} "
        f"{'step':>8} {'step+save':>9} {'slowdown':>8}")
  for r in rows:
    print(f"{r['model']:18} {r['params']:>11,} {r['bytes'] / 2**20:>7.1f}MB {r['save_block']:>10.3f}s "
          f"{r['save_total']:>9.3f}s {r['restore']:>7.3f}s {r['step']:>7.3f}s {r['step_saving']:>8.3f}s "
          f"{100 * (r['step_saving'] / r['step'] - 1):>7.1f}%")


if __name__ == "__main__":
  main()
