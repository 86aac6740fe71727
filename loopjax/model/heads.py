"""What reads the hidden state after each loop step: the LM head (logits or its CE) and the exit gate."""

import jax
import jax.numpy as jnp
from flax import nnx

from loopjax.model.layers import dense, rows, upcast
from loopjax.model.stack import ParamSpec, create_params
from loopjax.sharding import constrain, mesh_axis


def token_cross_entropy(logits_BSV: jax.Array, targets_BS: jax.Array) -> jax.Array:
  """Per-token CE = logsumexp(logits) - logits[target], in (at least) float32. Shape [B, S]."""
  logits_BSV = upcast(logits_BSV)
  target_logit_BS = jnp.take_along_axis(logits_BSV, targets_BS[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_BSV, axis=-1) - target_logit_BS


@jax.named_scope("lm_head")
def lm_logits(h_BSD: jax.Array, kernel_DV: jax.Array) -> jax.Array:
  """Logits [B, S, V] of the LM head, accumulated and returned in (at least) float32."""
  logits = dense(h_BSD, kernel_DV.astype(h_BSD.dtype), 1,
                 preferred_element_type=jnp.promote_types(h_BSD.dtype, jnp.float32))
  return constrain(logits, ("batch", "seq", "act_vocab"))


@jax.custom_vjp
def _ce_saving_logit_grads(h_BSD: jax.Array, kernel_DV: jax.Array, targets_BS: jax.Array) -> jax.Array:
  """Per-token CE whose backward pass reuses d CE / d logits from the forward: 3 head matmuls, not 4."""
  return token_cross_entropy(lm_logits(h_BSD, kernel_DV), targets_BS)


def _ce_forward(h_BSD, kernel_DV, targets_BS):
  """CE and the residual softmax - onehot (d CE_bs / d logits_bs), kept in the compute dtype."""
  logits_BSV = upcast(lm_logits(h_BSD, kernel_DV))
  log_z_BS = jax.nn.logsumexp(logits_BSV, axis=-1)
  ce_BS = log_z_BS - jnp.take_along_axis(logits_BSV, targets_BS[..., None], axis=-1)[..., 0]
  onehot_BSV = jax.nn.one_hot(targets_BS, logits_BSV.shape[-1], dtype=logits_BSV.dtype)
  dlogits_BSV = jnp.exp(logits_BSV - log_z_BS[..., None]) - onehot_BSV
  dlogits_BSV = constrain(dlogits_BSV.astype(h_BSD.dtype), ("batch", "seq", "act_vocab"))
  return ce_BS, (h_BSD, kernel_DV, dlogits_BSV)


def _ce_backward(residuals, g_BS):
  h_BSD, kernel_DV, dlogits_BSV = residuals
  d_BSV = dlogits_BSV * g_BS[..., None].astype(dlogits_BSV.dtype)
  dh_BSD = dense(d_BSV, kernel_DV.astype(d_BSV.dtype).T, 1).astype(h_BSD.dtype)
  dkernel_DV = jnp.matmul(rows(h_BSD, h_BSD.shape[-1]).T, rows(d_BSV, d_BSV.shape[-1]),
                         preferred_element_type=jnp.promote_types(h_BSD.dtype, jnp.float32))
  return dh_BSD, dkernel_DV.astype(kernel_DV.dtype), None


_ce_saving_logit_grads.defvjp(_ce_forward, _ce_backward)


@jax.named_scope("lm_head")
def lm_cross_entropy(h_BSD: jax.Array, kernel_DV: jax.Array, targets_BS: jax.Array, chunk: int = 0,
                     save_logit_grads: bool = False) -> jax.Array:
  """Per-token CE [B, S] of the LM head, the way the backward pass gets its logits chosen by the caller.

  save_logit_grads: the forward keeps d CE / d logits ([B, S, V] in the compute dtype) for the
  backward pass, which then needs two matmuls (dh, dkernel) and no recomputation: the fastest path
  when the logits fit (see `LoopedModel.step_losses`, model.loss_remat).
  Otherwise the head + CE is wrapped in `jax.checkpoint`: the backward pass recomputes the logits from
  the [B, S, D] state (a 4th head matmul), and with `chunk > 0` the sequence is processed in chunks
  by a scan, so at most [B, chunk, V] logits exist at once. At Ouro's vocab (49,152) this is the
  difference between fitting and not: T x B x S x V float32 logits are the largest activation.
  """
  if save_logit_grads:
    return _ce_saving_logit_grads(h_BSD, kernel_DV, targets_BS)
  ce = jax.checkpoint(lambda h, targets: token_cross_entropy(lm_logits(h, kernel_DV), targets))
  batch, seq, _ = h_BSD.shape
  shards = mesh_axis("seq")[1]  # context parallelism: each device chunks its own positions
  if not chunk or chunk >= seq // shards:
    return ce(h_BSD, targets_BS)
  if (seq // shards) % chunk:
    raise ValueError(f"loss chunks of {chunk} do not tile the {seq // shards} positions of each device")
  n = seq // shards // chunk
  # Step i takes chunk i of every device's positions, [B, shards x chunk] split like the sequence: scanning
  # over the sequence's own chunks would walk across devices, and XLA would gather it onto each of them.
  to_steps = lambda x: jnp.moveaxis(x.reshape(batch, shards, n, chunk, *x.shape[2:]), 2, 0).reshape(
      n, batch, shards * chunk, *x.shape[2:])
  _, ce_NBK = jax.lax.scan(lambda carry, xs: (carry, ce(*xs)), None, (to_steps(h_BSD), to_steps(targets_BS)))
  return jnp.moveaxis(ce_NBK.reshape(n, batch, shards, chunk), 0, 2).reshape(batch, seq)


HEAD = ParamSpec(lambda D, V: (D, V), ("embed", "vocab"), "normal", True)
GATE_PARAMS = {
    "kernel": ParamSpec(lambda D: (D,), ("embed",), "normal", True),
    "bias": ParamSpec(lambda D: (), (), "zeros", False),
}


def head_param(hidden: int, vocab: int, *, init_std: float, param_dtype, rngs: nnx.Rngs) -> nnx.Param:
  """An untied LM head kernel [D, V]."""
  return HEAD.create((hidden, vocab), init_std=init_std, param_dtype=param_dtype, rngs=rngs)


@jax.named_scope("exit_gate")
def gate_logits(h_BSD: jax.Array, kernel_D: jax.Array, bias: jax.Array) -> jax.Array:
  """gate = h . w + b per token [B, S], in (at least) float32. Pre-sigmoid."""
  return jnp.einsum("bsd,d->bs", upcast(h_BSD), upcast(kernel_D)) + upcast(bias)


class ExitGate(nnx.Module):
  """The exit gate's parameters: Linear(D -> 1) with a bias, read by `gate_logits`."""

  def __init__(self, hidden: int, *, init_std: float, param_dtype, rngs: nnx.Rngs, bias_init: float = 0.0):
    create_params(self, GATE_PARAMS, (hidden,), init_std=init_std, param_dtype=param_dtype, rngs=rngs)
    self.bias[...] = self.bias[...] + bias_init  # model.gate_bias_init: where the exit mass starts
