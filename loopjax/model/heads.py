"""What reads the hidden state after each loop step: the LM head (logits or its CE) and the exit gate."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from loopjax.exits import exit_distribution

from loopjax.model.layers import upcast
from loopjax.sharding import constrain


def token_cross_entropy(logits_BSV: jax.Array, targets_BS: jax.Array) -> jax.Array:
  """Per-token CE = logsumexp(logits) - logits[target], in (at least) float32. Shape [B, S]."""
  logits_BSV = upcast(logits_BSV)
  target_logit_BS = jnp.take_along_axis(logits_BSV, targets_BS[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_BSV, axis=-1) - target_logit_BS


def lm_logits(h_BSD: jax.Array, kernel_DV: jax.Array) -> jax.Array:
  """Logits [B, S, V] of the LM head, accumulated and returned in (at least) float32."""
  logits = jnp.einsum("bsd,dv->bsv", h_BSD, kernel_DV.astype(h_BSD.dtype),
                      preferred_element_type=jnp.promote_types(h_BSD.dtype, jnp.float32))
  return constrain(logits, ("batch", "seq", "act_vocab"))


def lm_cross_entropy(h_BSD: jax.Array, kernel_DV: jax.Array, targets_BS: jax.Array, chunk: int = 0) -> jax.Array:
  """Per-token CE [B, S] of the LM head, never keeping [B, S, V] logits for the backward pass.

  The head + CE is wrapped in `jax.checkpoint`, so the backward pass recomputes logits from the
  [B, S, D] hidden state instead of storing them; with `chunk > 0` the sequence is also processed in
  chunks by a scan, so at most [B, chunk, V] logits exist at once. At Ouro's vocab (49,152) this is the
  difference between fitting and not: T x B x S x V float32 logits are the largest activation.
  """
  ce = jax.checkpoint(lambda h, targets: token_cross_entropy(lm_logits(h, kernel_DV), targets))
  batch, seq, _ = h_BSD.shape
  if not chunk or chunk >= seq:
    return ce(h_BSD, targets_BS)
  n = seq // chunk
  h_NBCD = jnp.moveaxis(h_BSD.reshape(batch, n, chunk, -1), 1, 0)
  targets_NBC = jnp.moveaxis(targets_BS.reshape(batch, n, chunk), 1, 0)
  _, ce_NBC = jax.lax.scan(lambda carry, xs: (carry, ce(*xs)), None, (h_NBCD, targets_NBC))
  return jnp.moveaxis(ce_NBC, 0, 1).reshape(batch, seq)


def head_param(hidden: int, vocab: int, *, init_std: float, param_dtype, rngs: nnx.Rngs) -> nnx.Param:
  """An untied LM head kernel [D, V]."""
  return nnx.Param(init_std * jax.random.normal(rngs.params(), (hidden, vocab), param_dtype),
                   logical_axes=("embed", "vocab"))


class ExitGate(nnx.Module):
  """gate_t = h . w + b per token: Linear(D -> 1) with a bias, in float32. Pre-sigmoid."""

  def __init__(self, hidden: int, *, init_std: float, param_dtype, rngs: nnx.Rngs):
    self.kernel = nnx.Param(init_std * jax.random.normal(rngs.params(), (hidden,), param_dtype),
                            logical_axes=("embed",))
    self.bias = nnx.Param(jnp.zeros((), param_dtype), logical_axes=())

  def __call__(self, h_BSD: jax.Array) -> jax.Array:
    return jnp.einsum("bsd,d->bs", upcast(h_BSD), upcast(self.kernel[...])) + upcast(self.bias[...])


class LoopOutput(NamedTuple):
  step_logits: jax.Array  # [T, B, S, V] float32
  gate_logits: jax.Array  # [T, B, S] float32, pre-sigmoid
  exit_probs: jax.Array  # [T, B, S], p(t) of the exit distribution


class StepReadouts:
  """The two calls every model offers, on top of its `run_steps(tokens, read_out, ...)`."""

  def __call__(self, tokens_BS, *, segment_ids_BS=None, positions_BS=None, loop_steps: int | None = None):
    """Per-step logits, gate logits and exit probabilities (evaluation, import checks)."""
    logits_TBSV, gate_TBS = self.run_steps(tokens_BS, lm_logits, segment_ids_BS=segment_ids_BS,
                                           positions_BS=positions_BS, loop_steps=loop_steps)
    return LoopOutput(logits_TBSV, gate_TBS, exit_distribution(gate_TBS))

  def step_losses(self, tokens_BS, targets_BS, *, segment_ids_BS=None, positions_BS=None,
                  loop_steps: int | None = None):
    """(ce_TBS, gate_logits_TBS): every step's per-token next-token CE (logits never kept) and gates."""
    def read_out(h_BSD, kernel_DV):
      return lm_cross_entropy(h_BSD, kernel_DV, targets_BS, self.cfg.loss_chunk)
    return self.run_steps(tokens_BS, read_out, segment_ids_BS=segment_ids_BS, positions_BS=positions_BS,
                          loop_steps=loop_steps)
