"""The decode-time KV cache and its strategies (SPEC section 2): what each token leaves for later tokens.

Layout: k and v are [C, L, B, K, S_max, H] (C cache slots, L layers, B rows, K kv heads, S_max
positions, H head_dim): C x L caches in the released code's per-layer layout [B, K, S, H]. Kv heads
before positions keep each head's keys contiguous for the attention dot; with positions before heads
([C, L, B, S, K, H]) XLA copies every layer's keys and values into that order at every step, and
decoding at 1024 positions was 1.3x slower on CPU. A token produces one K/V per loop step and layer,
[T, L, B, K, H]; a strategy reduces that over the step axis to the C slots it stores, and a later
token's loop step t reads slot `read_slot(t)`:

  full   C = T   slot t holds step t's K/V (what the released code keeps)      step t reads slot t
  last   C = 1   the last step's K/V                                           every step reads it
  first  C = 1   the first step's K/V                                          every step reads it
  mean   C = 1   the mean over the T steps                                     every step reads it

A token that exits early at step e has no K/V for steps after e: its per-step K/V are defined as the
exit step's copied to the deeper steps (the paper's runs passed the exit step's K/V forward), so `full`
stores step e's K/V in slots e..T-1, `last` stores step e's, and `mean` averages the T filled steps.
The token being decoded never reads its own cache entry: it attends to its fresh K/V of the current
step (`attention.attend`), so the reduction is written once, after the token's loop.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from loopjax.infer.inputs import STRATEGIES


class KVCache(NamedTuple):
  k_CLBKSH: jax.Array
  v_CLBKSH: jax.Array


def num_slots(strategy: str, loop_steps: int) -> int:
  """C, the cache slots per layer: T for `full`, 1 for the others."""
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown KV cache strategy {strategy!r}; one of {STRATEGIES}")
  return loop_steps if strategy == "full" else 1


def read_slot(strategy: str, t: jax.Array) -> jax.Array:
  """The slot loop step t reads: t for `full`, else the one slot."""
  return t if strategy == "full" else jnp.zeros_like(t)


def reduce_steps(strategy: str, kv_T_: jax.Array) -> jax.Array:
  """A token's per-step K/V [T, ...] -> the [C, ...] slots the strategy stores."""
  if strategy == "full":
    return kv_T_
  if strategy == "last":
    return kv_T_[-1:]
  if strategy == "first":
    return kv_T_[:1]
  return jnp.mean(kv_T_, axis=0, keepdims=True, dtype=jnp.promote_types(kv_T_.dtype, jnp.float32)
                  ).astype(kv_T_.dtype)


def empty(strategy: str, loop_steps: int, num_layers: int, batch: int, cache_len: int, kv_heads: int,
          head_dim: int, dtype) -> KVCache:
  shape = (num_slots(strategy, loop_steps), num_layers, batch, kv_heads, cache_len, head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def write_prefix(cache: KVCache, strategy: str, k_TLBKSH: jax.Array, v_TLBKSH: jax.Array) -> KVCache:
  """Stores the prompt's per-step K/V (prefill, full depth) at positions 0..S-1 of every row."""
  def put(cache_CLBKSH, kv_TLBKSH):
    return jax.lax.dynamic_update_slice(cache_CLBKSH, reduce_steps(strategy, kv_TLBKSH), (0,) * 6)
  return KVCache(put(cache.k_CLBKSH, k_TLBKSH), put(cache.v_CLBKSH, v_TLBKSH))


def write_token(cache: KVCache, strategy: str, k_TLBKH: jax.Array, v_TLBKH: jax.Array,
                pos_B: jax.Array) -> KVCache:
  """Stores one token per row (its per-step K/V, exit step already copied deeper) at position pos_B[b].

  """
  rows_B = jnp.arange(pos_B.shape[0])

  def put(cache_CLBKSH, kv_TLBKH):
    # Index arrays on two axes that are not adjacent put their (row) axis first: [B, C, L, K, H].
    return cache_CLBKSH.at[:, :, rows_B, :, pos_B].set(jnp.moveaxis(reduce_steps(strategy, kv_TLBKH), 2, 0))
  return KVCache(put(cache.k_CLBKSH, k_TLBKH), put(cache.v_CLBKSH, v_TLBKH))


def cache_bytes(strategy: str, loop_steps: int, num_layers: int, batch: int, cache_len: int,
                kv_heads: int, head_dim: int, dtype) -> int:
  """Bytes of k and v together."""
  slots = num_slots(strategy, loop_steps)
  return 2 * slots * num_layers * batch * cache_len * kv_heads * head_dim * jnp.dtype(dtype).itemsize
