"""Decoding speed with and without early exit, KV-cache memory per strategy, and each strategy's quality.

  loopjax train --config configs/smoke.py --workdir /tmp/gen_bench --config.train.steps=300
  python bench/bench_generate.py --workdir /tmp/gen_bench

1. Speed: `decode.generate_jit` on the trained model, held-out multi-hop prompts, greedy, at batch 1
   and 8, at full depth (T steps per token) and with Q-exit q=0.5. Decode tokens/s excludes prefill
   (timed separately and subtracted). "steps run" is the while_loop's trip count per token (the deepest
   row of the batch); the ideal time is full depth x steps run / T, and "of ideal" is the measured
   saving over the ideal saving. Ratios use CPU time (see `measure`); tokens/s is wall time.
2. Cache bytes per strategy: measured on this model's cache, and Ouro-1.4B's shape at 4096 positions.
3. Quality vs `full`: each held-out question is fed token by token through the decoder (teacher
   forcing from its first token, so every K/V is the strategy's) at full depth and at q=0.5; answer
   NLL, answer exact match, and how often the greedy prediction equals that of `full` at full depth,
   at the answer and at every position (the smoke model trains on answers only: the other positions'
   predictions are untrained).
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import machine_line, median, print_table, spread
from loopjax.evaluation import generation
from loopjax.infer import cache, decode, load

OURO_1P4B = dict(loop_steps=4, num_layers=24, kv_heads=16, head_dim=128, dtype=jnp.bfloat16)


def measure(fns: dict, repeats: int) -> dict:
  """name -> (wall seconds, CPU seconds) per repeat; the fns take turns, so load drift hits all alike.

  CPU time (this process, all threads) is the figure to compare on a shared machine: wall time also
  counts the time our threads wait for a core.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile
  times = {name: ([], []) for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      wall, cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn())
      times[name][0].append(time.perf_counter() - wall)
      times[name][1].append(time.process_time() - cpu)
  return times


def speed_rows(model, weights, prompts, cache_len: int, new_tokens: int, repeats: int):
  m = model.cfg
  rows = []
  for batch in (1, 8):
    prompts_BP = jnp.asarray(prompts[:batch], jnp.int32)
    lengths_B = jnp.full((batch,), prompts_BP.shape[1], jnp.int32)
    spec = decode.spec_for(m, loop_steps=m.loop_steps, strategy="full", cache_len=cache_len,
                           max_new_tokens=new_tokens)
    prefill = jax.jit(decode.prefill, static_argnames="spec")
    modes = {"full depth": decode.NO_EXIT, "q=0.5": 0.5}
    fns = {name: functools.partial(decode.generate_jit, weights, spec, prompts_BP, lengths_B, jax.random.key(0),
                                   jnp.float32(q)) for name, q in modes.items()}
    times = measure({"prefill": lambda: prefill(weights, spec, prompts_BP), **fns}, repeats)
    prefill_wall, prefill_cpu = (median(x) for x in times.pop("prefill"))
    base = None
    for name, (walls, cpus) in times.items():
      out = fns[name]()
      depth, trips = float(np.mean(out.exit_steps_BN)), float(np.mean(out.loop_trips_N))
      cpu_ms = 1e3 * (median(cpus) - prefill_cpu) / new_tokens
      base = base or cpu_ms
      ideal = trips / m.loop_steps
      rows.append([batch, name, f"{batch * new_tokens / (median(walls) - prefill_wall):,.0f}", f"{cpu_ms:.3f}",
                   spread(cpus), f"{depth:.2f}", f"{trips:.2f}", f"{cpu_ms / base:.2f} (ideal {ideal:.2f})",
                   "-" if ideal == 1 else f"{(1 - cpu_ms / base) / (1 - ideal):.2f}"])
  return rows


def random_model(config: str):
  """A freshly initialised model of configs/<config>.py (its exit gate starts near lambda = 0.5)."""
  from flax import nnx

  from common import load_config
  from loopjax.model import build_model
  return build_model(load_config(config).model, nnx.Rngs(0))


def memory_rows(source, weights, prompts):
  """Bytes of the cache prefill returns (batch 8) per strategy, and Ouro-1.4B's by the formula."""
  m = source.model.cfg
  measured = {}
  for strategy in cache.STRATEGIES:
    spec = decode.spec_for(m, loop_steps=m.loop_steps, strategy=strategy, cache_len=source.max_len, max_new_tokens=1)
    measured[strategy] = sum(x.nbytes for x in decode.prefill(weights, spec, jnp.asarray(prompts[:8], jnp.int32)))
  return [[s, f"{n:,}", f"{n / measured['full']:.3f}",
           f"{cache.cache_bytes(s, batch=1, cache_len=4096, **OURO_1P4B) / 2**20:,.0f} MiB"]
          for s, n in measured.items()]


def quality_rows(source, weights, docs_BS):
  """Teacher-forced decode of every doc from its first token, per strategy and threshold, vs `full`."""
  m = source.model.cfg
  B, S = docs_BS.shape
  forced_BN = jnp.asarray(docs_BS[:, 1:], jnp.int32)
  targets_NB = docs_BS[:, 1:].T
  rows, reference = [], {}
  for name, q in (("full depth", decode.NO_EXIT), ("q=0.5", 0.5)):
    for strategy in cache.STRATEGIES:
      spec = decode.spec_for(m, loop_steps=m.loop_steps, strategy=strategy, cache_len=S, max_new_tokens=S - 1,
                             keep_logits=True)
      out = decode.generate_jit(weights, spec, jnp.asarray(docs_BS[:, :1], jnp.int32), jnp.ones((B,), jnp.int32),
                                jax.random.key(0), jnp.float32(q), forced_BN)
      logits_NBV = np.asarray(out.logits_NBV, np.float64)
      lse_NB = np.log(np.exp(logits_NBV - logits_NBV.max(-1, keepdims=True)).sum(-1)) + logits_NBV.max(-1)
      nll_NB = lse_NB - np.take_along_axis(logits_NBV, targets_NB[..., None], -1)[..., 0]
      greedy_NB = logits_NBV.argmax(-1)
      reference.setdefault(name, greedy_NB)
      agree_NB = greedy_NB == reference["full depth"]
      rows.append([name, strategy, f"{nll_NB[-1].mean():.4f}", f"{(greedy_NB[-1] == targets_NB[-1]).mean():.3f}",
                   f"{agree_NB[-1].mean():.3f}", f"{agree_NB.mean():.3f}", f"{np.mean(out.exit_steps_BN):.2f}"])
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="/tmp/gen_bench", help="a trained Ouro run (configs/smoke.py)")
  parser.add_argument("--new_tokens", type=int, default=120)
  parser.add_argument("--random_config", default="small", help="also time a random-init model of this config")
  parser.add_argument("--questions", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  source = load.from_checkpoint(args.workdir)
  weights = jax.device_put(decode.weights_of(source.model))
  prompts, answers = generation.questions(source.run_config, args.questions)
  docs_BS = np.array([p + a for p, a in zip(prompts, answers)], np.int32)
  print(f"{machine_line()}, {time.strftime('%Y-%m-%d')}; model {args.workdir} step {source.step} "
        f"(T={source.model.cfg.loop_steps}), prompts of {len(prompts[0])} tokens")
  headers = ["batch", "exit", "tokens/s (wall)", "CPU ms/token", "spread", "mean exit step", "steps run",
             "CPU time vs full depth", "of ideal saving"]
  print_table(f"Decode speed, trained smoke model, {args.new_tokens} new tokens after {len(prompts[0])}, greedy, "
              f"median of {args.repeats}", headers,
              speed_rows(source.model, weights, prompts, source.max_len, args.new_tokens, args.repeats))
  if args.random_config:
    model = random_model(args.random_config)
    vocab = model.cfg.vocab_size
    random_prompts = np.random.default_rng(0).integers(0, vocab, (8, 16)).tolist()
    print_table(f"Decode speed, random-init {args.random_config} model, {args.new_tokens} new tokens after 16, "
                f"greedy, median of {args.repeats}", headers,
                speed_rows(model, jax.device_put(decode.weights_of(model)), random_prompts, 16 + args.new_tokens,
                           args.new_tokens, args.repeats))
  print_table("KV cache bytes (k + v)", ["strategy", f"this model, batch 8 x {source.max_len} positions",
                                         "vs full", "Ouro-1.4B, batch 1 x 4096, bf16"],
              memory_rows(source, weights, prompts))
  print_table(f"Quality vs full, {len(docs_BS)} held-out questions, teacher-forced decode from the first token",
              ["exit", "strategy", "answer NLL", "answer exact match", "agreement with full: answer",
               "all positions", "mean exit step"],
              quality_rows(source, weights, docs_BS))


if __name__ == "__main__":
  main()
