"""The Ouro loop step for inference: the same layer math as training, with attention over a KV cache.

Training's `layers.attention` attends within one sequence and returns no K/V. A decoder needs each
layer's K/V (to cache them) and attention over keys from two places: the cache (earlier tokens) and
the tokens being computed now. `attend` takes the key blocks separately and joins only their scores,
so the cache is read in place and never concatenated with the new keys. Prefill is the same code with
no cached block: the prompt attends causally to itself at each loop step.

Weights are the training layout (wq [D,N,H], wk/wv [D,K,H], wo [N,H,D], stacked on a leading L axis);
GQA repeats each kv head N/K times (query head n reads kv head n // (N/K), as `repeat_interleave`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.infer.cache import KVCache
from loopjax.model import layers
from loopjax.model.heads import gate_logits
from loopjax.model.ouro import LoopParts


class KeyBlock(NamedTuple):
  """Keys and values one group of queries may read, and which (query, key) pairs are allowed."""
  k_BKTH: jax.Array
  v_BKTH: jax.Array
  allowed_BST: jax.Array  # bool, broadcastable to [B, S, T]


class StepSettings(NamedTuple):
  """What every cached loop step needs besides weights and activations."""
  cos_BSH: jax.Array
  sin_BSH: jax.Array
  eps: float
  dtype: jnp.dtype


def attend(q_BSNH: jax.Array, blocks: list[KeyBlock]) -> jax.Array:
  """softmax(q k^T / sqrt(H)) v over the keys of all blocks together, in (at least) float32.

  (bfloat16 operands with a float32 result, the cheaper form, are not implemented by XLA's CPU dot.)
  """
  B, S, N, H = q_BSNH.shape
  K = blocks[0].k_BKTH.shape[1]
  q_BSKGH = layers.upcast(q_BSNH).reshape(B, S, K, N // K, H) * H**-0.5
  scores = [jnp.where(b.allowed_BST[:, None, None],
                      jnp.einsum("bskgh,bkth->bkgst", q_BSKGH, layers.upcast(b.k_BKTH)), -jnp.inf)
            for b in blocks]
  weights_BKGST = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
  ends = np.cumsum([b.k_BKTH.shape[2] for b in blocks])[:-1]
  out_BSKGH = sum(jnp.einsum("bkgst,bkth->bskgh", w, layers.upcast(b.v_BKTH))
                  for w, b in zip(jnp.split(weights_BKGST, ends, axis=-1), blocks))
  return out_BSKGH.reshape(B, S, N, H).astype(q_BSNH.dtype)


def project(w_DXH: jax.Array, x_BSD: jax.Array, dtype) -> jax.Array:
  """x [B, S, D] @ w [D, X, H] -> [B, S, X, H] (X = N or K heads) in the compute dtype."""
  return jnp.einsum("bsd,dxh->bsxh", x_BSD, w_DXH.astype(dtype))


def cached_layer(p: dict, x_BSD: jax.Array, cached: KeyBlock | None, self_allowed_SS: jax.Array,
                 s: StepSettings):
  """One sandwich layer (SPEC section 1) -> (out_BSD, k_BKSH, v_BKSH), attending to `cached` and itself."""
  u_BSD = layers.rms_norm(x_BSD, p["norm_attn_in"], s.eps)
  q_BSNH = layers.apply_rope(project(p["wq"], u_BSD, s.dtype), s.cos_BSH, s.sin_BSH)
  k_BKSH = jnp.swapaxes(layers.apply_rope(project(p["wk"], u_BSD, s.dtype), s.cos_BSH, s.sin_BSH), 1, 2)
  v_BKSH = jnp.swapaxes(project(p["wv"], u_BSD, s.dtype), 1, 2)
  blocks = ([] if cached is None else [cached]) + [KeyBlock(k_BKSH, v_BKSH, self_allowed_SS[None])]
  attn_BSD = jnp.einsum("bsnh,nhd->bsd", attend(q_BSNH, blocks), p["wo"].astype(s.dtype))
  h_BSD = x_BSD + layers.rms_norm(attn_BSD, p["norm_attn_out"], s.eps)
  mlp_BSD = layers.swiglu_mlp(p, layers.rms_norm(h_BSD, p["norm_mlp_in"], s.eps), s.dtype)
  return h_BSD + layers.rms_norm(mlp_BSD, p["norm_mlp_out"], s.eps), k_BKSH, v_BKSH


class Past(NamedTuple):
  """The cache a decode step reads: slot `slot` of every layer, keys allowed per query by `allowed_BST`."""
  cache: KVCache
  slot: jax.Array  # int32 scalar
  allowed_BST: jax.Array


def cached_loop_step(parts: LoopParts, h_BSD: jax.Array, s: StepSettings, past: Past | None = None):
  """One loop iteration (L layers, final norm, exit gate) -> (h_BSD, gate_BS, k_LBKSH, v_LBKSH).

  With `past`, each layer reads its own [B, K, T, H] slice of the cache slot inside the layer scan
  (a slice of the cache, not a copy of the slot); with None the S tokens attend causally to each
  other only (prefill).
  """
  S = h_BSD.shape[1]
  self_allowed_SS = jnp.tril(jnp.ones((S, S), bool))

  def body(x_BSD, xs):
    p, l = xs
    block = None
    if past is not None:
      block = KeyBlock(past.cache.k_CLBKSH[past.slot, l], past.cache.v_CLBKSH[past.slot, l], past.allowed_BST)
    x_BSD, k_BKSH, v_BKSH = cached_layer(p, x_BSD, block, self_allowed_SS, s)
    return x_BSD, (k_BKSH, v_BKSH)

  num_layers = jax.tree.leaves(parts.stack)[0].shape[0]
  h_BSD, (k_LBKSH, v_LBKSH) = jax.lax.scan(body, h_BSD, (parts.stack, jnp.arange(num_layers)))
  h_BSD = layers.rms_norm(h_BSD, parts.final_norm_D, s.eps)
  return h_BSD, gate_logits(h_BSD, parts.gate_kernel_D, parts.gate_bias), k_LBKSH, v_LBKSH
