"""Transformer building blocks as pure functions of (params, activations).

Keeping the math free of modules lets the same function run inside `jax.lax.scan` over stacked
layer parameters (`loopjax.model.stack`), be rematerialised with a named policy, and be read next to
the formulas in SPEC section 1. Shapes: B batch, S sequence, D hidden, N query heads, K kv heads,
H head_dim, F mlp hidden, V vocab.
"""

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from loopjax.sharding import constrain


def upcast(x: jax.Array) -> jax.Array:
  """x in at least float32: bf16/f16 go up to f32, float64 (numerical checks) stays float64."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def rms_norm(x_BSD: jax.Array, weight_D: jax.Array, eps: float) -> jax.Array:
  """y = w * x / sqrt(mean(x^2) + eps), computed in float32 and cast back to x's dtype."""
  x32 = upcast(x_BSD)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (upcast(weight_D) * y).astype(x_BSD.dtype)


def layer_norm(x_BSD: jax.Array, scale_D: jax.Array, bias_D: jax.Array, eps: float) -> jax.Array:
  """GPT-2 LayerNorm (with bias), in float32."""
  x32 = upcast(x_BSD)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * upcast(scale_D) + upcast(bias_D)).astype(x_BSD.dtype)


def rope_tables(positions_BS: jax.Array, head_dim: int, base: float, dtype=jnp.float32):
  """cos/sin [B, S, H] for the rotate-half (non-interleaved) RoPE convention, in at least float32.

  Computed once per forward and reused by every layer and every loop step.
  """
  dtype = jnp.promote_types(dtype, jnp.float32)
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim))
  angles_BSh = positions_BS.astype(dtype)[..., None] * inv_freq
  angles_BSH = jnp.concatenate([angles_BSh, angles_BSh], axis=-1)
  return jnp.cos(angles_BSH), jnp.sin(angles_BSH)


def apply_rope(x_BSNH: jax.Array, cos_BSH: jax.Array, sin_BSH: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x2, x1)."""
  x1, x2 = jnp.split(upcast(x_BSNH), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = upcast(x_BSNH) * cos_BSH[:, :, None] + rotated * sin_BSH[:, :, None]
  return out.astype(x_BSNH.dtype)


def attention_mask(segment_ids_BS: jax.Array | None) -> jax.Array | None:
  """[B, 1, S, S] boolean: causal and within the same (non-padding) document; None if unpacked."""
  if segment_ids_BS is None:
    return None
  same_doc = segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :]
  seq = segment_ids_BS.shape[1]
  causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
  # Padding rows (segment 0) still attend to themselves so softmax never sees an empty row.
  return (same_doc & causal)[:, None]


def float64_attention(q_BSNH, k_BSKH, v_BSKH, mask_B1SS) -> jax.Array:
  """Causal softmax attention entirely in the inputs' dtype.

  `jax.nn.dot_product_attention` always takes the softmax in float32; float64 runs (gradient and
  numerical checks) use this instead so nothing in the model rounds to float32.
  """
  B, S, N, H = q_BSNH.shape
  K = k_BSKH.shape[2]
  q_BSKGH = q_BSNH.reshape(B, S, K, N // K, H)
  scores_BKGST = jnp.einsum("bskgh,btkh->bkgst", q_BSKGH, k_BSKH) * H**-0.5
  allowed = jnp.tril(jnp.ones((S, S), bool)) if mask_B1SS is None else mask_B1SS[:, :, None]
  weights = jax.nn.softmax(jnp.where(allowed, scores_BKGST, -jnp.inf), axis=-1)
  return jnp.einsum("bkgst,btkh->bskgh", weights, v_BSKH).reshape(B, S, N, H)


def attention(p: dict, x_BSD: jax.Array, cos_BSH, sin_BSH, mask_B1SS, dtype) -> jax.Array:
  """Causal multi-head / grouped-query attention with optional RoPE and document mask.

  p holds wq [D,N,H], wk/wv [D,K,H], wo [N,H,D] (and GPT-2 biases bq/bk/bv [N,H], bo [D] if present).
  """
  def proj(w, b=None):
    y = jnp.einsum("bsd,dnh->bsnh", x_BSD, w.astype(dtype))
    return y if b is None else y + b.astype(dtype)

  q_BSNH = constrain(proj(p["wq"], p.get("bq")), ("batch", "seq", "act_heads", None))
  k_BSKH = constrain(proj(p["wk"], p.get("bk")), ("batch", "seq", "act_heads", None))
  v_BSKH = constrain(proj(p["wv"], p.get("bv")), ("batch", "seq", "act_heads", None))
  if cos_BSH is not None:
    q_BSNH = apply_rope(q_BSNH, cos_BSH, sin_BSH)
    k_BSKH = apply_rope(k_BSKH, cos_BSH, sin_BSH)
  if jnp.dtype(dtype) == jnp.float64:
    out_BSNH = float64_attention(q_BSNH, k_BSKH, v_BSKH, mask_B1SS)
  else:
    out_BSNH = jax.nn.dot_product_attention(
        q_BSNH, k_BSKH, v_BSKH, mask=mask_B1SS, is_causal=mask_B1SS is None,
        scale=q_BSNH.shape[-1] ** -0.5)
  out_BSD = jnp.einsum("bsnh,nhd->bsd", out_BSNH, p["wo"].astype(dtype))
  if "bo" in p:
    out_BSD = out_BSD + p["bo"].astype(dtype)
  return checkpoint_name(constrain(out_BSD, ("batch", "seq", "act_embed")), "attention_out")


def swiglu_mlp(p: dict, x_BSD: jax.Array, dtype) -> jax.Array:
  """down( silu(gate(x)) * up(x) ), no biases."""
  gate_BSF = jnp.einsum("bsd,df->bsf", x_BSD, p["w_gate"].astype(dtype))
  up_BSF = jnp.einsum("bsd,df->bsf", x_BSD, p["w_up"].astype(dtype))
  hidden_BSF = constrain(jax.nn.silu(gate_BSF) * up_BSF, ("batch", "seq", "act_mlp"))
  return constrain(jnp.einsum("bsf,fd->bsd", hidden_BSF, p["w_down"].astype(dtype)),
                   ("batch", "seq", "act_embed"))


def gelu_mlp(p: dict, x_BSD: jax.Array, dtype) -> jax.Array:
  """GPT-2 MLP: fc2( gelu_tanh(fc1(x) + b1) ) + b2."""
  h_BSF = jnp.einsum("bsd,df->bsf", x_BSD, p["w_fc"].astype(dtype)) + p["b_fc"].astype(dtype)
  h_BSF = constrain(jax.nn.gelu(h_BSF, approximate=True), ("batch", "seq", "act_mlp"))
  out = jnp.einsum("bsf,fd->bsd", h_BSF, p["w_proj"].astype(dtype)) + p["b_proj"].astype(dtype)
  return constrain(out, ("batch", "seq", "act_embed"))


def sandwich_layer(p: dict, x_BSD, cos_BSH, sin_BSH, mask_B1SS, *, eps: float, dtype) -> jax.Array:
  """The Ouro decoder layer, four RMSNorms:

    h   = x + norm_attn_out( attention( norm_attn_in(x) ) )
    out = h + norm_mlp_out( mlp( norm_mlp_in(h) ) )
  """
  attn = attention(p, rms_norm(x_BSD, p["norm_attn_in"], eps), cos_BSH, sin_BSH, mask_B1SS, dtype)
  h_BSD = x_BSD + rms_norm(attn, p["norm_attn_out"], eps)
  mlp = swiglu_mlp(p, rms_norm(h_BSD, p["norm_mlp_in"], eps), dtype)
  return h_BSD + rms_norm(mlp, p["norm_mlp_out"], eps)


def gpt2_layer(p: dict, x_BSD, mask_B1SS, *, eps: float, dtype) -> jax.Array:
  """GPT-2 pre-norm block: x + attn(ln_1(x)), then + mlp(ln_2(.)). Learned positions, no RoPE."""
  h_BSD = x_BSD + attention(p, layer_norm(x_BSD, p["ln1_scale"], p["ln1_bias"], eps), None, None,
                            mask_B1SS, dtype)
  return h_BSD + gelu_mlp(p, layer_norm(h_BSD, p["ln2_scale"], p["ln2_bias"], eps), dtype)

