"""Choosing the next token from its logits: greedy (temperature 0), or sampling with top-k / top-p."""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Sampling(NamedTuple):
  """Static (hashable) sampling settings. temperature 0 is greedy; top_k 0 and top_p 1 are off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0


def top_k_mask(logits_BV: jax.Array, k: int) -> jax.Array:
  """Logits outside the k largest of each row set to -inf (ties with the k-th kept)."""
  kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
  return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def top_p_mask(logits_BV: jax.Array, p: float) -> jax.Array:
  """Nucleus: keep the most likely tokens whose probability mass before them is < p (at least one)."""
  sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  cutoff_B1 = jnp.min(jnp.where(mass_before_BV < p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)


def sample(logits_BV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  """int32 [B]: argmax at temperature 0, else a draw from softmax(logits / temperature) after the masks."""
  if s.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / s.temperature
  if s.top_k:
    logits_BV = top_k_mask(logits_BV, s.top_k)
  if s.top_p < 1.0:
    logits_BV = top_p_mask(logits_BV, s.top_p)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
