"""Attention cores on this host: forward + backward time of `xla` and `blocked` (`auto`'s CPU choice).

python bench/bench_attention.py [--batch 8 --heads 8 --kv_heads 8 --head_dim 32 --seqs 256,1024]
Rows hold 4 documents each (segment ids), as packed training batches do.
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
  parser.add_argument("--blocks", default="32,64,128,256")
  args = parser.parse_args()
  print(f"{'seq':>6} {'impl':>14} {'fwd+bwd ms':>11} {'CPU ms':>9}")
  for seq in map(int, args.seqs.split(",")):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (args.batch, seq, args.heads, args.head_dim))
    k, v = (jax.random.normal(key, (args.batch, seq, args.kv_heads, args.head_dim)) for key in keys[1:])
    segment_ids = jnp.asarray(np.repeat(np.arange(1, 5), seq // 4)[None].repeat(args.batch, 0), jnp.int32)
    cases = [("xla", 0)] + [("blocked", b) for b in map(int, args.blocks.split(",")) if b <= seq]
    for impl, block in cases:
      mask = attention.Mask(segment_ids, impl, block, block)
      loss = lambda q, k, v, mask=mask: attention.core(q, k, v, mask, "float32").sum()
      step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      name = impl if not block else f"{impl}/{block}"
      wall, cpu = time_call(step, q, k, v)
      print(f"{seq:>6} {name:>14} {1e3 * wall:>11.1f} {1e3 * cpu:>9.1f}", flush=True)


if __name__ == "__main__":
  main()
