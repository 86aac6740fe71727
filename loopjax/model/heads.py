"""What reads the hidden state after each loop step: the LM head (logits or its CE) and the exit gate."""

import jax
import jax.numpy as jnp
from flax import nnx

from loopjax.model.layers import upcast
from loopjax.model.stack import ParamSpec, create_params
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


HEAD = ParamSpec(lambda D, V: (D, V), ("embed", "vocab"), "normal", True)
GATE_PARAMS = {
    "kernel": ParamSpec(lambda D: (D,), ("embed",), "normal", True),
    "bias": ParamSpec(lambda D: (), (), "zeros", False),
}


def head_param(hidden: int, vocab: int, *, init_std: float, param_dtype, rngs: nnx.Rngs) -> nnx.Param:
  """An untied LM head kernel [D, V]."""
  return HEAD.create((hidden, vocab), init_std=init_std, param_dtype=param_dtype, rngs=rngs)


def gate_logits(h_BSD: jax.Array, kernel_D: jax.Array, bias: jax.Array) -> jax.Array:
  """gate = h . w + b per token [B, S], in (at least) float32. Pre-sigmoid."""
  return jnp.einsum("bsd,d->bs", upcast(h_BSD), upcast(kernel_D)) + upcast(bias)


class ExitGate(nnx.Module):
  """The exit gate's parameters: Linear(D -> 1) with a bias, read by `gate_logits`."""

  def __init__(self, hidden: int, *, init_std: float, param_dtype, rngs: nnx.Rngs):
    create_params(self, GATE_PARAMS, (hidden,), init_std=init_std, param_dtype=param_dtype, rngs=rngs)
