"""Checkpoint cost per codec (checkpoint.compress off / on): save (blocking part and until on disk),
restore, bytes on disk, and the train-step time while an async save is in flight vs without, for the
smoke model and the small config (21M, T=4; issue #11's goal: the step with a save in flight within
1.10x of the step without). The step times of the three conditions are interleaved in one process.

  python bench/bench_checkpoint.py [--steps 3] [--rounds 3]

One host device; the real jitted train step (bench.common), the real loopjax.checkpoint.Checkpointer.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Bench, load_config, median  # noqa: E402

from loopjax import checkpoint as ck  # noqa: E402


CODECS = ("none", "zstd")  # checkpoint.compress = False (the default) / True


def models():
  return [("smoke", load_config("smoke")), ("small", load_config("small"))]


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _save_costs(saver, state, target) -> dict:
  """Blocking part and until-on-disk of three saves, three restores and the bytes of one checkpoint."""
  items = {"params": state.params, "opt_state": state.opt_state}
  saver.save(0, items, meta={"phase": "bench"})  # the first save pays one-off set-up
  saver.wait()
  blocking, total, restore = [], [], []
  for step in (1, 2, 3):
    start = time.perf_counter()
    saver.save(step, items, meta={"phase": "bench"})
    blocking.append(time.perf_counter() - start)
    saver.wait()
    total.append(time.perf_counter() - start)
  for step in (1, 2, 3):
    start = time.perf_counter()
    jax.block_until_ready(saver.restore(step, target).items)
    restore.append(time.perf_counter() - start)
  return {"bytes": _dir_bytes(os.path.join(str(saver.directory), "3")), "save_block": median(blocking),
          "save_total": median(total), "restore": median(restore)}


def measure(name, cfg, steps: int, rounds: int, root: str) -> list[dict]:
  """One row per codec; the step times of all conditions interleaved over `rounds` in this process."""
  bench = Bench(cfg)
  compiled, _, _ = bench.compile(cfg)
  state = bench.fresh_state()
  with jax.set_mesh(bench.mesh):
    for _ in range(2):  # warm up
      state, metrics = compiled(state, bench.batch)
    jax.block_until_ready(state)
    savers = {codec: ck.Checkpointer(os.path.join(root, name, codec), keep=100, compress=codec == "zstd")
              for codec in CODECS}
    target = {"params": bench.abstract.params, "opt_state": bench.abstract.opt_state}
    costs = {codec: _save_costs(saver, state, target) for codec, saver in savers.items()}
    times = {condition: [] for condition in (None, *CODECS)}
    step_id = 10
    for _ in range(rounds):
      for condition, samples in times.items():
        for _ in range(steps):
          if condition:
            savers[condition].wait()
            step_id += 1  # the save returns with the write in flight
            savers[condition].save(step_id, {"params": state.params, "opt_state": state.opt_state},
                                   meta={"phase": "bench"})
          start = time.perf_counter()
          state, metrics = compiled(state, bench.batch)
          jax.block_until_ready(state)
          samples.append(time.perf_counter() - start)
    for saver in savers.values():
      saver.close()
  plain = median(times[None])
  return [dict(costs[codec], model=name, codec=codec, params=bench.num_params, step=plain,
               step_saving=median(times[codec])) for codec in CODECS]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=3, help="train steps timed per condition and round")
  parser.add_argument("--rounds", type=int, default=3, help="rounds of (no save, each codec), interleaved")
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix="bench_ckpt_")
  try:
    rows = [row for name, cfg in models() for row in measure(name, cfg, args.steps, args.rounds, root)]
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(f"\n{jax.devices()[0].device_kind} x{jax.device_count()}, medians")
  print(f"{'model':6} {'codec':6} {'params':>11} {'on disk':>9} {'save blocks':>11} {'save total':>10} {'restore':>8} "
        f"{'step':>8} {'step+save':>9} {'slowdown':>8}")
  for r in rows:
    print(f"{r['model']:6} {r['codec']:6} {r['params']:>11,} {r['bytes'] / 2**20:>7.1f}MB {r['save_block']:>10.3f}s "
          f"{r['save_total']:>9.3f}s {r['restore']:>7.3f}s {r['step']:>7.3f}s {r['step_saving']:>8.3f}s "
          f"{100 * (r['step_saving'] / r['step'] - 1):>7.1f}%")


if __name__ == "__main__":
  main()
