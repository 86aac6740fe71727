"""lm-eval benchmark throughput: requests/s of the shipped multiple-choice task, and a benchmark eval's cost
in training steps.

  loopjax train --config configs/smoke.py --workdir /tmp/harness_bench
  python bench/bench_harness.py --workdir /tmp/harness_bench

1. multihop_mc (200 questions x 4 choices = 800 log-likelihood requests) through lm-eval's `evaluate`
   and the `loopjax` backend, at T=1, T=2, T=4 and Q-exit q=0.5 each alone, and as one sweep of the four
   (one forward at T=4 per row serves all of them). Compiles happen in an untimed first call; each call then
   builds lm-eval's requests, scores them and computes the metric, all timed. Median of --repeats.
2. The in-training sweep (the hook with eval.loop_steps=1,2,4, eval.q_exit=0.5, multihop_mc) against
   the run's own jitted train step (configs/smoke.py, same process, same device): how many training
   steps one benchmark evaluation costs.
"""

import argparse
import time

import jax

from common import Bench, load_config, machine_line, median, print_table, spread, time_steps
from loopjax.evaluation.harness import model as model_lib
from loopjax.evaluation.harness import sweep
from loopjax.evaluation.harness.depth import Depth, sweep_depths


def timed(fn, repeats: int) -> tuple[list[float], list[float]]:
  """(wall seconds, CPU seconds) of each of `repeats` calls, after one untimed call (the compiles)."""
  fn()
  walls, cpus = [], []
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
  return walls, cpus


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="/tmp/harness_bench", help="a trained run of configs/smoke.py")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch_rows", type=int, default=32)
  parser.add_argument("--train_steps", type=int, default=50, help="train steps per timing of the step")
  args = parser.parse_args()
  loaded = model_lib.from_source(model_lib.load_source(checkpoint=args.workdir))
  tasks = sweep.load_tasks(["multihop_mc"])
  requests = sum(len(list(t.eval_docs)) * 4 for t in tasks["tasks"].values())
  print(f"{machine_line()}, {time.strftime('%Y-%m-%d')}; {args.workdir}, batch {args.batch_rows} rows")
  settings = {"T=1": [Depth(1)], "T=2": [Depth(2)], "T=4": [Depth(4)], "q=0.5 (at T=4)": [Depth(4, 0.5)],
              "T=1,2,4 + q=0.5 (one sweep)": sweep_depths("1,2,4", "0.5", 4)}
  rows, alone = [], [0.0, 0.0]
  for name, depths in settings.items():
    run = sweep.Sweep(loaded, tasks, depths, batch_rows=args.batch_rows)
    walls, cpus = timed(run, args.repeats)
    scored = requests * len(depths)
    rows.append([name, scored, f"{median(walls):.2f}", spread(walls), f"{median(cpus):.2f}", spread(cpus),
                 f"{scored / median(walls):,.0f}", f"{scored / median(cpus):,.0f}"])
    if len(depths) == 1:
      alone = [alone[0] + median(walls), alone[1] + median(cpus)]
  rows.append(["the four alone, summed", requests * 4, f"{alone[0]:.2f}", "", f"{alone[1]:.2f}", "",
               f"{requests * 4 / alone[0]:,.0f}", f"{requests * 4 / alone[1]:,.0f}"])
  print_table(f"multihop_mc through lm-eval, {requests} requests per depth, median of {args.repeats}",
              ["depths", "requests scored", "wall s", "spread", "CPU s", "spread", "requests/s (wall)",
               "requests/CPU s"], rows)

  cfg = load_config("smoke")
  cfg.eval.loop_steps, cfg.eval.harness_tasks, cfg.eval.harness_every_steps = "1,2,4", "multihop_mc", 100
  bench = Bench(cfg)
  with jax.set_mesh(bench.mesh):
    compiled, _, _ = bench.compile(cfg, bench.state)
    state, _, _ = time_steps(compiled, bench.fresh_state(), bench.batch, 3)
    step_walls, step_cpus = [], []
    for _ in range(args.repeats):
      state, wall, cpu = time_steps(compiled, state, bench.batch, args.train_steps)  # the step donates its state
      step_walls.append(wall)
      step_cpus.append(cpu)
  hook = sweep.training_sweep(cfg, bench.mesh, sweep.training_tasks(cfg))
  params = jax.device_put(loaded.params, jax.tree.map(lambda x: x.sharding, bench.state.params))
  walls, cpus = timed(lambda: hook(params), args.repeats)
  print_table("One in-training benchmark eval vs one train step (configs/smoke.py, same process)",
              ["", "train step", "benchmark eval", "spread", "eval / step"],
              [["wall s", f"{median(step_walls):.4f}", f"{median(walls):.2f}", spread(walls),
                f"{median(walls) / median(step_walls):.1f} steps"],
               ["CPU s", f"{median(step_cpus):.4f}", f"{median(cpus):.2f}", spread(cpus),
                f"{median(cpus) / median(step_cpus):.1f} steps"]])


if __name__ == "__main__":
  main()
