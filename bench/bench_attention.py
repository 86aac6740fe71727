"""Attention cores on this host: forward and forward + backward time of xla, blocked and native.

python bench/bench_attention.py [--batch 8 --heads 8 --kv_heads 8 --head_dim 32 --seqs 256,1024
                                 --impls xla,blocked,native --blocks 32,64,128,256 --rounds 2]
Rows hold 4 documents each (segment ids), as packed training batches do. The cases run interleaved,
`--rounds` times, so a change in the machine's load shows as a spread rather than as a ranking.
"useful GF/s" counts the flops of allowed (same-document, causal) pairs only: 4 H flops per pair
forward (two matmuls), 2.5x that for forward + backward (five matmuls, one of them recomputed).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.model import attention


def time_call(fn, *args, repeats: int = 7) -> tuple[float, float]:
  """Median (wall, CPU) seconds of a compiled call (after one warm-up). CPU time counts every thread of
  this process and is the less noisy of the two on a shared machine."""
  jax.block_until_ready(fn(*args))
  walls, cpus = [], []
  for _ in range(repeats):
    start, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    walls.append(time.perf_counter() - start)
    cpus.append(time.process_time() - cpu)
  return float(np.median(walls)), float(np.median(cpus))


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv_heads", type=int, default=8)
  parser.add_argument("--head_dim", type=int, default=32)
  parser.add_argument("--seqs", default="256,1024")
  parser.add_argument("--impls", default="xla,blocked,native")
  parser.add_argument("--blocks", default="32,64,128,256", help="blocked's block sizes")
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  impls = args.impls.split(",")
  print(f"{'seq':>6} {'impl':>12} {'fwd ms':>8} {'fwd+bwd ms':>11} {'CPU ms':>9} {'useful GF/s':>11}")
  for seq in map(int, args.seqs.split(",")):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (args.batch, seq, args.heads, args.head_dim))
    k, v = (jax.random.normal(key, (args.batch, seq, args.kv_heads, args.head_dim)) for key in keys[1:])
    segment_ids = jnp.asarray(np.repeat(np.arange(1, 5), seq // 4)[None].repeat(args.batch, 0), jnp.int32)
    pairs = args.batch * args.heads * 4 * (seq // 4) * (seq // 4 + 1) / 2
    gflop = 4 * args.head_dim * pairs / 1e9
    cases = [(impl, block) for impl in impls
             for block in ([b for b in map(int, args.blocks.split(",")) if b <= seq] if impl == "blocked" else [0])]
    steps = {}
    for impl, block in cases:
      mask = attention.Mask(segment_ids, impl, block, block)
      core = lambda q, k, v, mask=mask: attention.core(q, k, v, mask, "float32")
      steps[impl, block] = jax.jit(core), jax.jit(jax.grad(lambda q, k, v, core=core: core(q, k, v).sum(), (0, 1, 2)))
    for _ in range(args.rounds):
      for (impl, block), (forward, both) in steps.items():
        fwd, _ = time_call(forward, q, k, v)
        wall, cpu = time_call(both, q, k, v)
        name = impl if not block else f"{impl}/{block}"
        print(f"{seq:>6} {name:>12} {1e3 * fwd:>8.1f} {1e3 * wall:>11.1f} {1e3 * cpu:>9.1f} "
              f"{2.5 * gflop / wall:>11.1f}", flush=True)


if __name__ == "__main__":
  main()
