"""Transformer building blocks as pure functions of (params, activations).

Keeping the math free of modules lets the same function run inside `jax.lax.scan` over stacked
layer parameters (`loopjax.model.stack`), be rematerialised with a named policy, and be read next to
the formulas in SPEC section 1. Shapes: B batch, S sequence, D hidden, N query heads, K kv heads,
H head_dim, F mlp hidden, V vocab.
"""

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from loopjax.model import attention as attention_lib
from loopjax.sharding import constrain, mesh_axis


def upcast(x: jax.Array) -> jax.Array:
  """x in at least float32: bf16/f16 go up to f32, float64 (numerical checks) stays float64."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def rows(x: jax.Array, width: int) -> jax.Array:
  """x [B, S, ...] as a 2-D [rows, width] matmul operand. Under context parallelism (the mesh splits S c
  ways) the rows go context-major, [c, B, S / c]: each device's rows are then one block of them, while
  B-major rows would interleave the devices' positions, a layout XLA cannot express, so it would gather the
  whole sequence onto every device of the group and repeat the work there."""
  shards = mesh_axis("seq")[1]
  if shards > 1 and x.ndim > 2:
    B, S = x.shape[:2]
    x = x.reshape(B, shards, S // shards, -1).swapaxes(0, 1)
  return x.reshape(-1, width)


def unrows(y: jax.Array, lead: tuple[int, ...], trailing: tuple[int, ...]) -> jax.Array:
  """The inverse of `rows`: y [rows, ...] as [*lead, *trailing], lead = (B, S, ...) of the rows' source."""
  shards = mesh_axis("seq")[1]
  if shards > 1 and len(lead) > 1:
    B, S = lead[:2]
    y = y.reshape(shards, B, S // shards, -1).swapaxes(0, 1)
  return y.reshape(*lead, *trailing)


def dense(x: jax.Array, w: jax.Array, contract: int, preferred_element_type=None) -> jax.Array:
  """x's last `contract` axes times w's first `contract` axes, as one 2-D matmul [rows, in] @ [in, out].

  Same math as the einsum ("bsd,dnh->bsnh", "bsnh,nhd->bsd", ...), but flattened to 2-D: XLA:CPU
  lays the 3-D einsums' gradients out with transposes that cost about as much as the matmuls
  (an MLP's gradient measured 1.8x faster flattened; BENCHMARKS.md, "Step efficiency"). `rows` keeps the
  flattening local to each device under context parallelism.
  """
  lead, out = x.shape[:x.ndim - contract], w.shape[contract:]
  inner = math.prod(w.shape[:contract])
  y = jnp.matmul(rows(x, inner), w.reshape(inner, -1), preferred_element_type=preferred_element_type)
  return unrows(y, lead, out)


@jax.named_scope("norm")
def rms_norm(x_BSD: jax.Array, weight_D: jax.Array, eps: float) -> jax.Array:
  """y = w * x / sqrt(mean(x^2) + eps), computed in float32 and cast back to x's dtype."""
  x32 = upcast(x_BSD)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (upcast(weight_D) * y).astype(x_BSD.dtype)


@jax.named_scope("norm")
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


@jax.named_scope("attention")
def attention(p: dict, x_BSD: jax.Array, cos_BSH, sin_BSH, mask: attention_lib.Mask | None, dtype) -> jax.Array:
  """Causal multi-head / grouped-query attention with optional RoPE and document mask.

  `mask` carries the documents and the core implementation (`loopjax.model.attention`); None = causal.

  p holds wq [D,N,H], wk/wv [D,K,H], wo [N,H,D] (and GPT-2 biases bq/bk/bv [N,H], bo [D] if present).
  """
  def proj(w, b=None):
    y = dense(x_BSD, w.astype(dtype), 1)
    return y if b is None else y + b.astype(dtype)

  q_BSNH = constrain(proj(p["wq"], p.get("bq")), ("batch", "seq", "act_heads", None))
  # Keys and values leave here split along the sequence like the queries (RoPE too runs on each device's
  # own positions); the core gathers them over the context axis, once per layer.
  k_BSKH = constrain(proj(p["wk"], p.get("bk")), ("batch", "seq", "act_heads", None))
  v_BSKH = constrain(proj(p["wv"], p.get("bv")), ("batch", "seq", "act_heads", None))
  if cos_BSH is not None:
    q_BSNH = apply_rope(q_BSNH, cos_BSH, sin_BSH)
    k_BSKH = apply_rope(k_BSKH, cos_BSH, sin_BSH)
  with jax.named_scope("core"):  # softmax(q k^T) v; the profile tells it from the projections
    out_BSNH = attention_lib.core(q_BSNH, k_BSKH, v_BSKH, mask, jnp.dtype(dtype).name)
  out_BSD = dense(out_BSNH, p["wo"].astype(dtype), 2)
  if "bo" in p:
    out_BSD = out_BSD + p["bo"].astype(dtype)
  return checkpoint_name(constrain(out_BSD, ("batch", "seq", "act_embed")), "attention_out")


@jax.named_scope("mlp")
def swiglu_mlp(p: dict, x_BSD: jax.Array, dtype) -> jax.Array:
  """down( silu(gate(x)) * up(x) ), no biases."""
  gate_BSF = dense(x_BSD, p["w_gate"].astype(dtype), 1)
  up_BSF = dense(x_BSD, p["w_up"].astype(dtype), 1)
  hidden_BSF = constrain(jax.nn.silu(gate_BSF) * up_BSF, ("batch", "seq", "act_mlp"))
  return constrain(dense(hidden_BSF, p["w_down"].astype(dtype), 1), ("batch", "seq", "act_embed"))


@jax.named_scope("mlp")
def gelu_mlp(p: dict, x_BSD: jax.Array, dtype) -> jax.Array:
  """GPT-2 MLP: fc2( gelu_tanh(fc1(x) + b1) ) + b2."""
  h_BSF = dense(x_BSD, p["w_fc"].astype(dtype), 1) + p["b_fc"].astype(dtype)
  h_BSF = constrain(jax.nn.gelu(h_BSF, approximate=True), ("batch", "seq", "act_mlp"))
  out = dense(h_BSF, p["w_proj"].astype(dtype), 1) + p["b_proj"].astype(dtype)
  return constrain(out, ("batch", "seq", "act_embed"))


def sandwich_layer(p: dict, x_BSD, cos_BSH, sin_BSH, mask, *, eps: float, dtype) -> jax.Array:
  """The Ouro decoder layer, four RMSNorms:

    h   = x + norm_attn_out( attention( norm_attn_in(x) ) )
    out = h + norm_mlp_out( mlp( norm_mlp_in(h) ) )
  """
  attn = attention(p, rms_norm(x_BSD, p["norm_attn_in"], eps), cos_BSH, sin_BSH, mask, dtype)
  h_BSD = x_BSD + rms_norm(attn, p["norm_attn_out"], eps)
  mlp = swiglu_mlp(p, rms_norm(h_BSD, p["norm_mlp_in"], eps), dtype)
  return h_BSD + rms_norm(mlp, p["norm_mlp_out"], eps)


def gpt2_layer(p: dict, x_BSD, mask, *, eps: float, dtype) -> jax.Array:
  """GPT-2 pre-norm block: x + attn(ln_1(x)), then + mlp(ln_2(.)). Learned positions, no RoPE."""
  h_BSD = x_BSD + attention(p, layer_norm(x_BSD, p["ln1_scale"], p["ln1_bias"], eps), None, None,
                            mask, dtype)
  return h_BSD + gelu_mlp(p, layer_norm(h_BSD, p["ln2_scale"], p["ln2_bias"], eps), dtype)

