"""Generation for lists of prompts: checks, batching into fixed shapes, and the jitted decoder.

    from loopjax.infer.generator import Options, generate_ids
    results = generate_ids(model, [[1, 5, 9], [1, 7]], Options(max_new_tokens=16, exit_threshold=0.5))
    results[0].generated_ids, results[0].exit_steps

Prompts are padded on the right to the longest one and cut into batches of `batch_size` rows (the
last batch filled with copies), so a whole request compiles once; the cache holds the longest prompt
plus the new tokens, rounded up to a multiple of 64 positions (at most `max_len`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.infer import decode, inputs
from loopjax.infer.sampling import Sampling


class Options(NamedTuple):
  max_new_tokens: int = 32
  loop_steps: int | None = None  # T; None = the model's trained T
  exit_threshold: float | None = None  # Q-exit q in (0, 1]; None = every loop step (full depth)
  kv_cache: str = "full"
  sampling: Sampling = Sampling()
  seed: int = 0
  eos_ids: tuple[int, ...] = ()
  batch_size: int = 8


class Result(NamedTuple):
  prompt_ids: list[int]
  generated_ids: list[int]  # up to and including an EOS id
  exit_steps: list[int]  # the loop step (1..T) each generated token was read out at


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def check(model_cfg, prompt_ids: list[list[int]], opts: Options, max_len: int):
  """Every check of `inputs` for this model and request (GenerateError on the first problem)."""
  s = opts.sampling
  inputs.check_settings(max_new_tokens=opts.max_new_tokens, loop_steps=opts.loop_steps or model_cfg.loop_steps,
                        exit_threshold=opts.exit_threshold, kv_cache=opts.kv_cache, temperature=s.temperature,
                        top_k=s.top_k, top_p=s.top_p, vocab_size=model_cfg.vocab_size)
  inputs.check_prompts(prompt_ids, vocab_size=model_cfg.vocab_size, max_len=max_len,
                       max_new_tokens=opts.max_new_tokens)


def batches(prompt_ids: list[list[int]], batch_size: int):
  """(prompts_BP, lengths_B, rows used) per batch: right-padded to the longest prompt, the last filled."""
  width = max(len(p) for p in prompt_ids)
  for start in range(0, len(prompt_ids), batch_size):
    chunk = prompt_ids[start:start + batch_size]
    used = len(chunk)
    chunk = chunk + [chunk[0]] * (batch_size - used)
    prompts_BP = np.zeros((batch_size, width), np.int32)
    for row, ids in enumerate(chunk):
      prompts_BP[row, :len(ids)] = ids
    yield prompts_BP, np.array([len(p) for p in chunk], np.int32), used


def spec_for_request(model_cfg, prompt_ids: list[list[int]], opts: Options, max_len: int,
                     keep_logits: bool = False) -> decode.Spec:
  needed = max(len(p) for p in prompt_ids) + opts.max_new_tokens
  return decode.spec_for(model_cfg, loop_steps=opts.loop_steps or model_cfg.loop_steps, strategy=opts.kv_cache,
                         cache_len=min(max_len, round_up(needed, 64)), max_new_tokens=opts.max_new_tokens,
                         sampling=opts.sampling, eos_ids=tuple(opts.eos_ids), keep_logits=keep_logits)


def generate_ids(model, prompt_ids: list[list[int]], opts: Options, max_len: int = 1 << 20,
                 weights: decode.Weights | None = None) -> list[Result]:
  """Checks the request, then generates for every prompt (in order). `weights`: already on device."""
  check(model.cfg, prompt_ids, opts, max_len)
  spec = spec_for_request(model.cfg, prompt_ids, opts, max_len)
  weights = jax.device_put(decode.weights_of(model)) if weights is None else weights
  threshold = jnp.float32(decode.NO_EXIT if opts.exit_threshold is None else opts.exit_threshold)
  results = []
  for index, (prompts_BP, lengths_B, used) in enumerate(batches(prompt_ids, opts.batch_size)):
    key = jax.random.fold_in(jax.random.key(opts.seed), index)
    out = decode.generate_jit(weights, spec, prompts_BP, lengths_B, key, threshold)
    tokens_BN, exits_BN = np.asarray(out.tokens_BN), np.asarray(out.exit_steps_BN)
    for row in range(used):
      count = int((tokens_BN[row] >= 0).sum())
      results.append(Result(prompt_ids[len(results)], tokens_BN[row, :count].tolist(),
                            exits_BN[row, :count].tolist()))
  return results
