"""Train-step time, tokens/s and MFU of the real jitted step at T = 1, 2, 4, 8 with the same weights.

    python bench/bench_train.py                      # all three tables (a few minutes on 2 cores)
    python bench/bench_train.py --tables loops --configs smoke

Tables: "loops" (per config: T sweep, with step(T) / (T x step(T=1)); goal <= 1.05), "remat" (remat
policies at T=4 on the small model), "peer" (the shape of the peer figures in NOTES-stack.md).
Every variant of a table shares one initial state (the stack's parameters do not depend on T or the
remat policy) and is compiled up front; then the variants are timed in interleaved rounds, rotating
the order each round, and each cell reports the median round. The machine is shared: read the spread.
"""

import argparse
import math

import common
from loopjax import metrics as metrics_lib

LOOP_STEPS = (1, 2, 4, 8)
REMAT_POLICIES = ("none", "full", "save_matmuls", "save_attention_out")


def run_interleaved(bench, variants, *, rounds: int, warmup: int, min_steps: int, round_seconds: float):
  """variants: [(label, cfg)] -> {label: dict(times=[s/step per round], compile_s=...)}."""
  cells = {}
  for label, cfg in variants:
    compiled, _, compile_s = bench.compile(cfg, bench.state)
    state, warm = common.time_steps(compiled, bench.fresh_state(), bench.batch, warmup)
    steps = max(min_steps, math.ceil(round_seconds / warm))
    cells[label] = dict(cfg=cfg, compiled=compiled, state=state, steps=steps, times=[], compile_s=compile_s)
  labels = [label for label, _ in variants]
  for r in range(rounds):
    for label in labels[r % len(labels):] + labels[:r % len(labels)]:
      c = cells[label]
      c["state"], seconds = common.time_steps(c["compiled"], c["state"], bench.batch, c["steps"])
      c["times"].append(seconds)
  return cells


def throughput(cell, peak: float):
  """(median s/step, tokens/s, MFU) of a cell; FLOPs from loopjax.metrics (all T steps counted)."""
  cfg = cell["cfg"]
  step_s = common.median(cell["times"])
  tokens_s = cfg.train.batch_size * cfg.train.seq_len / step_s
  mfu = tokens_s * metrics_lib.train_flops_per_token(cfg.model, cfg.train.seq_len) / peak
  return step_s, tokens_s, mfu


def loops_table(name, args):
  cfg = common.load_config(name)
  bench = common.Bench(cfg)
  variants = [(T, common.with_model(cfg, loop_steps=T)) for T in LOOP_STEPS]
  cells = run_interleaved(bench, variants, **run_kwargs(args))
  base = common.median(cells[1]["times"])
  rows = []
  for T in LOOP_STEPS:
    step_s, tokens_s, mfu = throughput(cells[T], args.peak)
    rows.append((T, f"{1e3 * step_s:.1f}", common.spread(cells[T]["times"]), f"{tokens_s:,.0f}",
                 f"{100 * mfu:.1f}%", f"{step_s / (T * base):.3f}", f"{cells[T]['compile_s']:.1f}"))
  m = cfg.model
  common.print_table(
      f"{name}: {bench.num_params / 1e6:.2f}M params, D {m.hidden_size}, L {m.num_layers}, "
      f"vocab {m.vocab_size}, batch {cfg.train.batch_size} x seq {cfg.train.seq_len}, remat {m.remat}",
      ("T", "step ms", "spread", "tokens/s", "MFU", "step(T) / (T step(1))", "compile s"), rows)


def remat_table(args):
  cfg = common.with_model(common.load_config("small"), loop_steps=4)
  bench = common.Bench(cfg)
  cells = run_interleaved(bench, [(p, common.with_model(cfg, remat=p)) for p in REMAT_POLICIES],
                          **run_kwargs(args))
  rows = []
  for policy in REMAT_POLICIES:
    step_s, tokens_s, mfu = throughput(cells[policy], args.peak)
    rows.append((policy, f"{1e3 * step_s:.1f}", common.spread(cells[policy]["times"]), f"{tokens_s:,.0f}",
                 f"{100 * mfu:.1f}%", f"{cells[policy]['compile_s']:.1f}"))
  common.print_table("small, T=4: remat policy of the layer body",
                     ("remat", "step ms", "spread", "tokens/s", "MFU", "compile s"), rows)


def peer_table(args):
  cfg = common.load_config("peer")
  bench = common.Bench(cfg)
  variants = [("T=1, remat full", common.with_model(cfg, loop_steps=1)),
              ("T=4, remat full", common.with_model(cfg, loop_steps=4)),
              ("T=4, remat none", common.with_model(cfg, loop_steps=4, remat="none"))]
  cells = run_interleaved(bench, variants, **run_kwargs(args))
  rows = []
  for label, _ in variants:
    step_s, tokens_s, mfu = throughput(cells[label], args.peak)
    rows.append((f"loopjax L=4 {label}", f"{1e3 * step_s:.1f}", common.spread(cells[label]["times"]),
                 f"{tokens_s:,.0f}", f"{100 * mfu:.1f}%"))
  rows += [("Ouro PyTorch L=4 T=4 (NOTES-stack.md)", "", "", "~770", ""),
           ("MaxText 4 layers, non-looped, full remat (NOTES)", "", "", "~1,900", ""),
           ("MaxText 16 layers, non-looped, full remat (NOTES)", "", "", "~500", "")]
  common.print_table(f"peer shape: {bench.num_params / 1e6:.2f}M params, D 256, 8 heads, MLP 688, vocab 4096, "
                     "batch 8 x seq 256, fp32, L=4", ("run", "step ms", "spread", "tokens/s", "MFU"), rows)


def run_kwargs(args):
  return dict(rounds=args.rounds, warmup=args.warmup, min_steps=args.min_steps, round_seconds=args.round_seconds)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tables", default="loops,remat,peer", help="comma-separated: loops, remat, peer")
  parser.add_argument("--configs", default="smoke,small", help="configs for the loops table")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the variants")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant after compiling")
  parser.add_argument("--min-steps", type=int, default=2, help="timed steps per variant per round, at least")
  parser.add_argument("--round-seconds", type=float, default=0.5,
                      help="timed steps per round are raised until a round lasts about this long")
  args = parser.parse_args()
  args.peak = metrics_lib.peak_flops()
  print(f"{common.machine_line()}; peak (measured f32 matmul) {args.peak / 1e9:.0f} GFLOP/s")
  tables = args.tables.split(",")
  if "loops" in tables:
    for name in args.configs.split(","):
      loops_table(name, args)
  if "remat" in tables:
    remat_table(args)
  if "peer" in tables:
    peer_table(args)


if __name__ == "__main__":
  main()
