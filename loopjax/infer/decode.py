"""Prefill + decode for Ouro, jitted, with a KV cache and an early exit that skips the remaining steps.

    prefill:  the prompts (right-padded) run all T loop steps; their per-step K/V fill the cache
    decode:   per new token, a `lax.while_loop` over loop steps that stops once every row has exited

A row exits at the first step whose exit CDF reaches the threshold q (Q-exit, SPEC section 2; the
last step if none); with no threshold every row runs all T steps. Rows that exited keep their hidden
state while the others go on, and the loop ends when the last row exits, so a batch costs its deepest
row and a single sequence costs exactly its exit step. The K/V of the skipped steps are the exit
step's (`cache.py`), which is what later tokens read at those steps.

Each row has its own position: row b's prompt has `lengths[b]` tokens, and its n-th new token is
decoded at position lengths[b] - 1 + n. Prefill stops one token short of each prompt, in effect: the
last prompt token is decoded like every new token, so the first generated token also gets an adaptive
depth (prefill's K/V at that position are overwritten, and padding is never attended to).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from loopjax.exits import exit_cdf
from loopjax.infer import cache as cache_lib
from loopjax.infer.attention import Past, StepSettings, cached_loop_step
from loopjax.infer.sampling import Sampling, sample
from loopjax.model import layers
from loopjax.model.heads import lm_logits
from loopjax.model.ouro import LoopParts

NO_EXIT = float("inf")  # a threshold no CDF reaches: every row runs all T steps


class Weights(NamedTuple):
  """Everything decoding reads from a LoopLM, as a plain pytree (nothing NNX crosses `jax.jit`)."""
  parts: LoopParts
  embed_VD: jax.Array
  head_DV: jax.Array


class Spec(NamedTuple):
  """The static settings of one compiled generate: the shapes and everything that changes the program."""
  loop_steps: int
  strategy: str  # one of cache.STRATEGIES
  cache_len: int  # S_max: positions per row in the cache
  max_new_tokens: int
  eps: float
  rope_base: float
  dtype: str
  sampling: Sampling = Sampling()
  eos_ids: tuple[int, ...] = ()
  keep_logits: bool = False  # also return the logits each token was chosen from [N, B, V]


class Generated(NamedTuple):
  tokens_BN: jax.Array  # int32, -1 after a row's EOS
  exit_steps_BN: jax.Array  # int32, the loop step (1..T) each token was read out at; 0 after EOS
  loop_trips_N: jax.Array  # int32, loop steps the decode loop actually ran for token n (max over rows)
  logits_NBV: jax.Array | None


def weights_of(model) -> Weights:
  return Weights(model.loop_parts(), model.embed[...], model.head_kernel())


def spec_for(model_cfg, **settings) -> Spec:
  """A Spec with the model's eps, RoPE base and compute dtype; `settings` give the rest."""
  return Spec(eps=float(model_cfg.norm_eps), rope_base=float(model_cfg.rope_base),
              dtype=str(model_cfg.compute_dtype), **settings)


def _settings(spec: Spec, w: Weights, positions_BS: jax.Array) -> StepSettings:
  head_dim = w.parts.stack["wq"].shape[-1]
  cos_BSH, sin_BSH = layers.rope_tables(positions_BS, head_dim, spec.rope_base, jnp.dtype(spec.dtype))
  return StepSettings(cos_BSH, sin_BSH, spec.eps, jnp.dtype(spec.dtype))


def _embed(w: Weights, tokens_BS: jax.Array, spec: Spec) -> jax.Array:
  return jnp.take(w.embed_VD, tokens_BS, axis=0).astype(spec.dtype)


def prefill(w: Weights, spec: Spec, prompts_BP: jax.Array) -> cache_lib.KVCache:
  """A cache holding the prompts' K/V of all T steps (reduced by the strategy) at positions 0..P-1."""
  B, P = prompts_BP.shape
  s = _settings(spec, w, jnp.broadcast_to(jnp.arange(P), (B, P)))

  def step(h_BPD, _):
    h_BPD, _, k_LBKPH, v_LBKPH = cached_loop_step(w.parts, h_BPD, s)
    return h_BPD, (k_LBKPH, v_LBKPH)

  _, (k_TLBKPH, v_TLBKPH) = jax.lax.scan(step, _embed(w, prompts_BP, spec), length=spec.loop_steps)
  _, L, _, K, _, H = k_TLBKPH.shape
  empty = cache_lib.empty(spec.strategy, spec.loop_steps, L, B, spec.cache_len, K, H, jnp.dtype(spec.dtype))
  return cache_lib.write_prefix(empty, spec.strategy, k_TLBKPH, v_TLBKPH)


class _Steps(NamedTuple):
  """The carry of one token's loop over steps."""
  t: jax.Array  # steps run so far
  h_B1D: jax.Array
  exited_B: jax.Array
  exit_step_B: jax.Array  # 0-based
  gates_TB: jax.Array
  k_TLBKH: jax.Array  # this token's K/V per step; an exited row's exit-step K/V fill the deeper steps
  v_TLBKH: jax.Array


def decode_token(w: Weights, spec: Spec, kv: cache_lib.KVCache, token_B: jax.Array, pos_B: jax.Array,
                 skip_B: jax.Array, threshold: jax.Array):
  """One token per row at position pos_B -> (logits_BV, exit_step_B (0-based), steps run, new cache).

  Rows with skip_B set (finished) count as exited from the start, so they never keep the loop going.
  """
  T = spec.loop_steps
  s = _settings(spec, w, pos_B[:, None])
  allowed_B1S = (jnp.arange(spec.cache_len)[None] < pos_B[:, None])[:, None]
  _, L, B, K, _, H = kv.k_CLBKSH.shape
  buffer = jnp.zeros((T, L, B, K, H), kv.k_CLBKSH.dtype)
  start = _Steps(jnp.int32(0), _embed(w, token_B[:, None], spec), skip_B, jnp.full((B,), T - 1, jnp.int32),
                 jnp.zeros((T, B), jnp.float32), buffer, buffer)

  def running(c: _Steps):
    return (c.t < T) & ~jnp.all(c.exited_B)

  def step(c: _Steps) -> _Steps:
    past = Past(kv, cache_lib.read_slot(spec.strategy, c.t), allowed_B1S)
    h_B1D, gate_B1, k_LBK1H, v_LBK1H = cached_loop_step(w.parts, c.h_B1D, s, past)
    active_B = ~c.exited_B
    gates_TB = c.gates_TB.at[c.t].set(gate_B1[:, 0].astype(jnp.float32))
    exits_B = active_B & (exit_cdf(gates_TB)[c.t] >= threshold)
    fill_T1B11 = (jnp.arange(T) >= c.t)[:, None, None, None, None] & active_B[None, None, :, None, None]
    return _Steps(c.t + 1, jnp.where(active_B[:, None, None], h_B1D, c.h_B1D), c.exited_B | exits_B,
                  jnp.where(exits_B, c.t, c.exit_step_B), gates_TB,
                  jnp.where(fill_T1B11, k_LBK1H[:, :, :, 0][None], c.k_TLBKH),
                  jnp.where(fill_T1B11, v_LBK1H[:, :, :, 0][None], c.v_TLBKH))

  end = jax.lax.while_loop(running, step, start)
  kv = cache_lib.write_token(kv, spec.strategy, end.k_TLBKH, end.v_TLBKH, pos_B)
  return lm_logits(end.h_B1D, w.head_DV)[:, 0], end.exit_step_B, end.t, kv


class _Tokens(NamedTuple):
  """The carry of the loop over new tokens."""
  n: jax.Array
  kv: cache_lib.KVCache
  token_B: jax.Array  # the token to feed at step n
  done_B: jax.Array
  out: Generated


def generate(w: Weights, spec: Spec, prompts_BP: jax.Array, lengths_B: jax.Array, key: jax.Array,
             threshold: jax.Array, forced_BN: jax.Array | None = None) -> Generated:
  """Up to `spec.max_new_tokens` tokens per row after its prompt (prompts right-padded to P).

  `threshold` is the Q-exit q (a traced scalar, so sweeping q does not recompile; NO_EXIT for full
  depth). `forced_BN` (>= 0 where given) feeds those tokens instead of the sampled ones, which scores a
  known continuation through the same cache (teacher forcing). Stops early once every row has emitted
  one of `spec.eos_ids`.
  """
  B, N = prompts_BP.shape[0], spec.max_new_tokens
  logits = jnp.zeros((N, B, w.head_DV.shape[-1]), jnp.float32) if spec.keep_logits else None
  out = Generated(jnp.full((B, N), -1, jnp.int32), jnp.zeros((B, N), jnp.int32), jnp.zeros((N,), jnp.int32),
                  logits)
  eos = jnp.asarray(spec.eos_ids, jnp.int32)

  def running(c: _Tokens):
    return (c.n < N) & ~jnp.all(c.done_B)

  def step(c: _Tokens) -> _Tokens:
    logits_BV, exit_B, trips, kv = decode_token(w, spec, c.kv, c.token_B, lengths_B - 1 + c.n, c.done_B, threshold)
    chosen_B = sample(logits_BV, jax.random.fold_in(key, c.n), spec.sampling)
    if forced_BN is not None:
      chosen_B = jnp.where(forced_BN[:, c.n] >= 0, forced_BN[:, c.n], chosen_B)
    o = c.out
    out = Generated(o.tokens_BN.at[:, c.n].set(jnp.where(c.done_B, -1, chosen_B)),
                    o.exit_steps_BN.at[:, c.n].set(jnp.where(c.done_B, 0, exit_B + 1)),
                    o.loop_trips_N.at[c.n].set(trips),
                    None if o.logits_NBV is None else o.logits_NBV.at[c.n].set(logits_BV.astype(jnp.float32)))
    return _Tokens(c.n + 1, kv, chosen_B, c.done_B | jnp.isin(chosen_B, eos), out)

  start = _Tokens(jnp.int32(0), prefill(w, spec, prompts_BP), prompts_BP[jnp.arange(B), lengths_B - 1],
                  jnp.zeros((B,), bool), out)
  return jax.lax.while_loop(running, step, start).out


generate_jit = jax.jit(generate, static_argnames=("spec",))
