"""Train-step time, tokens/s and MFU of the real jitted step at T = 1, 2, 4, 8 with the same weights.

    python bench/bench_train.py                           # loops tables for smoke and small
    python bench/bench_train.py --tables remat,peer       # remat policies; the peer-figure shape

Tables: "loops" (per config: T sweep, with step(T) / (T x step(T=1)); goal <= 1.05), "remat" (remat
policies at T=4 on the small model), "peer" (the shape of the peer figures in NOTES-stack.md).
Every variant of a table shares one initial state (the stack's parameters do not depend on T or the
remat policy) and is compiled up front; then the variants are timed in interleaved rounds, rotating
the order each round, and each cell reports the median round. Wall time gives tokens/s and MFU;
CPU time (all threads of this process) is reported too because it is much less noisy when other
processes share the cores. "spread" is the (max - min) / median of the rounds' wall times.

MFU: the matmul probe (`common.matmul_peak`) is taken again at the start of every round, because on
these VMs it moves 1.5x within an hour; a cell's MFU is the median over rounds of its model FLOP/s
over that round's probe. `--cpu-devices N` gives the process N fake CPU devices: every variant runs on
device 0 alone unless its label says "N CPU devices", which runs it data-parallel over N (one op stream
per device, to fill the core XLA:CPU leaves idle between small ops; it measured no gain, BENCHMARKS.md).
"""

import argparse
import math
import os

import jax
import numpy as np

import common
from loopjax import config as config_lib
from loopjax.model import flops_per_token

LOOP_STEPS = (1, 2, 4, 8)
REMAT_POLICIES = config_lib.REMAT_POLICIES


def run_interleaved(variants, args):
  """variants: [(label, cfg, bench)] -> {label: cell}, each cell with its rounds' wall and CPU s/step and MFU."""
  cells = {}
  for label, cfg, bench in variants:
    compiled, _, compile_s = bench.compile(cfg, bench.state)
    state, warm, _ = common.time_steps(compiled, bench.fresh_state(), bench.batch, args.warmup)
    steps = max(args.min_steps, math.ceil(args.round_seconds / warm))
    cells[label] = dict(cfg=cfg, bench=bench, compiled=compiled, state=state, steps=steps, wall=[], cpu=[],
                        mfu=[], compile_s=compile_s)
  labels = [label for label, _, _ in variants]
  for r in range(args.rounds):
    peak = args.peak_gflops * 1e9 or common.matmul_peak()
    args.probes.append(peak)
    for label in labels[r % len(labels):] + labels[:r % len(labels)]:
      c = cells[label]
      c["state"], wall, cpu = common.time_steps(c["compiled"], c["state"], c["bench"].batch, c["steps"])
      c["wall"].append(wall)
      c["cpu"].append(cpu)
      c["mfu"].append(model_flops_per_second(c["cfg"], wall) / peak)
  for c in cells.values():
    cfg = c.pop("cfg")
    del c["compiled"], c["state"], c["bench"]
    c["step_s"], c["cpu_s"] = common.median(c["wall"]), common.median(c["cpu"])
    c["tokens_s"] = cfg.train.batch_size * cfg.train.seq_len / c["step_s"]
    c["flops_s"] = model_flops_per_second(cfg, c["step_s"])
    c["mfu"] = common.median(c["mfu"])
  return cells


def model_flops_per_second(cfg, step_s: float) -> float:
  return cfg.train.batch_size * cfg.train.seq_len / step_s * flops_per_token(cfg.model, cfg.train.seq_len)


def timing_columns(c):
  return (f"{1e3 * c['step_s']:,.0f}", common.spread(c["wall"]), f"{1e3 * c['cpu_s']:,.0f}",
          f"{c['tokens_s']:,.0f}", f"{c['flops_s'] / 1e9:.0f}", f"{100 * c['mfu']:.1f}%")


TIMING_HEADERS = ("wall ms/step", "spread", "CPU ms/step", "tokens/s", "model GFLOP/s", "MFU")


def describe(name, cfg, bench):
  m, t = cfg.model, cfg.train
  return (f"{name}: {bench.num_params / 1e6:.2f}M params, D {m.hidden_size}, {m.num_heads} heads, "
          f"MLP {m.mlp_dim}, L {m.num_layers}, vocab {m.vocab_size}, batch {t.batch_size} x seq {t.seq_len}, "
          f"{m.compute_dtype}")


def loops_table(name, args):
  cfg = common.load_config(name)
  bench = common.Bench(cfg, devices=jax.devices()[:1])
  cells = run_interleaved([(T, common.with_model(cfg, loop_steps=T), bench) for T in LOOP_STEPS], args)
  base = cells[1]
  rows = [(T, *timing_columns(c), f"{c['step_s'] / (T * base['step_s']):.2f}",
           f"{c['cpu_s'] / (T * base['cpu_s']):.2f}", f"{c['compile_s']:.1f}")
          for T, c in cells.items()]
  common.print_table(f"{describe(name, cfg, bench)}, remat {cfg.model.remat}; load avg {os.getloadavg()[0]:.1f}",
                     ("T", *TIMING_HEADERS, "wall(T) / T wall(1)", "CPU(T) / T CPU(1)", "compile s"), rows)
  for key, what in (("step_s", "wall"), ("cpu_s", "CPU")):
    per_step, fixed = np.polyfit(LOOP_STEPS, [1e3 * cells[T][key] for T in LOOP_STEPS], 1)
    print(f"least-squares fit, {what}: {fixed:,.0f} ms fixed + {per_step:,.0f} ms per loop step")


def remat_table(args):
  cfg = common.with_model(common.load_config("small"), loop_steps=4)
  bench = common.Bench(cfg, devices=jax.devices()[:1])
  cells = run_interleaved([(p, common.with_model(cfg, remat=p), bench) for p in REMAT_POLICIES], args)
  rows = [(policy, *timing_columns(c), f"{c['compile_s']:.1f}") for policy, c in cells.items()]
  common.print_table(f"{describe('small', cfg, bench)}, T=4: remat policy of the layer body; "
                     f"load avg {os.getloadavg()[0]:.1f}", ("remat", *TIMING_HEADERS, "compile s"), rows)


def peer_table(args):
  cfg = common.load_config("peer")
  bench = common.Bench(cfg, devices=jax.devices()[:1])
  variants = [("T=1, remat full", common.with_model(cfg, loop_steps=1)),
              ("T=4, remat full (default)", common.with_model(cfg, loop_steps=4)),
              ("T=4, remat full, head recomputed", common.with_model(cfg, loop_steps=4, loss_remat="recompute")),
              ("T=4, remat full, attention blocks 128", common.with_model(cfg, loop_steps=4, attention_block_q=128,
                                                                          attention_block_kv=128)),
              ("T=4, remat full, xla attention", common.with_model(cfg, loop_steps=4, attention="xla")),
              ("T=4, remat save_matmuls", common.with_model(cfg, loop_steps=4, remat="save_matmuls")),
              ("T=4, remat save_attention_core", common.with_model(cfg, loop_steps=4, remat="save_attention_core")),
              ("T=4, remat none", common.with_model(cfg, loop_steps=4, remat="none")),
              ("T=4, remat none, scans unrolled", common.with_model(cfg, loop_steps=4, remat="none", layer_unroll=4,
                                                                    loop_unroll=4)),
              ("T=1, remat none, layers unrolled", common.with_model(cfg, loop_steps=1, remat="none", layer_unroll=4)),
              ("T=1, remat full, native attention", common.with_model(cfg, loop_steps=1, attention="native")),
              ("T=4, remat full, native attention", common.with_model(cfg, loop_steps=4, attention="native")),
              ("T=4, remat full, blocked attention", common.with_model(cfg, loop_steps=4, attention="blocked")),
              ("T=4, remat save_attention_core, native attention",
               common.with_model(cfg, loop_steps=4, remat="save_attention_core", attention="native")),
              ("T=4, remat none, native attention", common.with_model(cfg, loop_steps=4, remat="none",
                                                                      attention="native"))]
  variants = [(label, c, bench) for label, c in variants if any(word in label for word in args.only.split("|"))]
  if (n := jax.device_count()) > 1:
    spread_bench = common.Bench(cfg)
    variants += [(f"T=4, remat full, {n} CPU devices", common.with_model(cfg, loop_steps=4), spread_bench),
                 (f"T=4, remat save_attention_core, {n} CPU devices",
                  common.with_model(cfg, loop_steps=4, remat="save_attention_core"), spread_bench)]
  cells = run_interleaved(variants, args)
  rows = [(f"loopjax L=4 {label}", *timing_columns(c)) for label, c in cells.items()]
  rows += [("Ouro PyTorch L=4 T=4 (issue #11, same machine kind)", "", "", "", "1,478", "159", ""),
           ("MaxText 16 layers, non-looped, full remat (NOTES)", "", "", "", "~500", "", "")]
  common.print_table(f"{describe('peer shape', cfg, bench)}; load avg {os.getloadavg()[0]:.1f}",
                     ("run", *TIMING_HEADERS), rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tables", default="loops", help="comma-separated: loops, remat, peer")
  parser.add_argument("--configs", default="smoke,small", help="configs/<name>.py for the loops table")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the variants")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant after compiling")
  parser.add_argument("--min-steps", type=int, default=1, help="timed steps per variant per round, at least")
  parser.add_argument("--round-seconds", type=float, default=1.0,
                      help="timed steps per round are raised until a round lasts about this long")
  parser.add_argument("--peak-gflops", type=float, default=0.0,
                      help="MFU denominator; 0 = XLA's float32 matmul FLOP/s measured in this process at the start "
                           "of every round (the better of 1024^3 and 2048^3, median of 5 runs each)")
  parser.add_argument("--only", default="",
                      help="peer table: only the variants whose label contains one of these |-separated strings")
  parser.add_argument("--cpu-devices", type=int, default=1,
                      help="fake CPU devices; > 1 adds peer variants run data-parallel over all of them")
  args = parser.parse_args()
  jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  args.probes = []
  print(f"{common.machine_line()}; MFU peak: "
        + (f"{args.peak_gflops:.0f} GFLOP/s (given)" if args.peak_gflops else
           f"XLA float32 matmul probe, taken every round (now {common.matmul_peak() / 1e9:.0f} GFLOP/s)"))
  tables = args.tables.split(",")
  if "loops" in tables:
    for name in args.configs.split(","):
      loops_table(name, args)
  if "remat" in tables:
    remat_table(args)
  if "peer" in tables:
    peer_table(args)
  if args.probes:
    print(f"matmul probe over the rounds: median {common.median(args.probes) / 1e9:.0f} GFLOP/s, "
          f"{min(args.probes) / 1e9:.0f}-{max(args.probes) / 1e9:.0f}")


if __name__ == "__main__":
  main()
