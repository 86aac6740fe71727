"""Compile time of the real jitted train step at the (L, T) cells of GRID, L up to 16 and T up to 8.

    python bench/bench_compile.py                  # smoke model dims, 2 rounds over the grid
    python bench/bench_compile.py --config small --rounds 3

Every cell is timed in a fresh Python process (`--cell L T`) with the persistent compilation cache
disabled, so nothing is reused between cells; cells run in interleaved rounds and each reports the
median. "lower" is tracing + lowering to StableHLO, "compile" is XLA's compile, both of the exact
step `loopjax train` runs (abstract state and batch with their shardings). Goal (issue #11): total at
(L=16, T=8) within 1.2x of (L=2, T=2), the smallest program with both loops (XLA deletes trip-count-1
loops, so (L=1, T=1) compiles a smaller program than any looped cell). "CPU s" is the process's CPU time for lower + compile, the
steadier figure when other processes share the cores.
"""

import argparse
import json
import subprocess
import sys
import time

import jax

import common

GRID = ((1, 1), (2, 2), (4, 4), (16, 1), (1, 8), (16, 8))  # (L, T)


def run_cell(config: str, num_layers: int, loop_steps: int) -> dict:
  """In this (fresh) process: lower and compile the train step once; returns the timings."""
  jax.config.update("jax_enable_compilation_cache", False)
  cfg = common.with_model(common.load_config(config), num_layers=num_layers, loop_steps=loop_steps)
  bench = common.Bench(cfg, init_state=False)
  cpu = time.process_time()
  _, lower_s, compile_s = bench.compile(cfg)
  return dict(lower_s=lower_s, compile_s=compile_s, cpu_s=time.process_time() - cpu)


def cell_in_subprocess(config: str, num_layers: int, loop_steps: int) -> dict:
  out = subprocess.run([sys.executable, __file__, "--config", config, "--cell", str(num_layers), str(loop_steps)],
                       check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="smoke", help="configs/<name>.py whose dims are used (L and T vary)")
  parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the grid")
  parser.add_argument("--cell", nargs=2, type=int, metavar=("L", "T"), help="internal: time one cell")
  args = parser.parse_args()
  if args.cell:
    print(json.dumps(run_cell(args.config, *args.cell)))
    return

  grid = list(GRID)
  runs = {cell: [] for cell in grid}
  for r in range(args.rounds):
    for cell in grid[r % len(grid):] + grid[:r % len(grid)]:
      runs[cell].append(cell_in_subprocess(args.config, *cell))
      print(f"round {r + 1}/{args.rounds} L={cell[0]} T={cell[1]}: {runs[cell][-1]}", file=sys.stderr, flush=True)

  def med(cell, key):
    return common.median([run[key] for run in runs[cell]])

  total = {cell: common.median([run["lower_s"] + run["compile_s"] for run in runs[cell]]) for cell in grid}
  rows = [(L, T, f"{med((L, T), 'lower_s'):.2f}", f"{med((L, T), 'compile_s'):.2f}", f"{total[(L, T)]:.2f}",
           common.spread([run["lower_s"] + run["compile_s"] for run in runs[(L, T)]]),
           f"{med((L, T), 'cpu_s'):.2f}", f"{total[(L, T)] / total[(2, 2)]:.2f}") for L, T in grid]
  print(common.machine_line())
  common.print_table(f"compile time of the train step, {args.config} dims, median of {args.rounds} fresh processes",
                     ("L", "T", "lower s", "compile s", "total s", "spread", "CPU s", "total / (L=2,T=2)"), rows)
  for base in ((2, 2), (4, 4), (1, 1)):
    print(f"(L=16,T=8) / (L={base[0]},T={base[1]}): {total[(16, 8)] / total[base]:.2f} wall, "
          f"{med((16, 8), 'cpu_s') / med(base, 'cpu_s'):.2f} CPU")
  print("goal: <= 1.2 against (L=2,T=2). XLA deletes trip-count-1 loops, so (L=1,T=1) compiles a smaller "
        "program than any cell with L > 1 and T > 1.")


if __name__ == "__main__":
  main()
