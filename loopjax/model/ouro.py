"""The Ouro LoopLM: one stack of L sandwich-norm layers applied T times per token.

    h = embed(tokens)                       # once
    for t in 1..T:                          # jax.lax.scan over loop steps (`loop_step`)
        h = layers_1..L(h)                  # jax.lax.scan over stacked layer params
        h = final_norm(h)                   # after every step; the normed h feeds step t+1
        logits_t = lm_head(h); gate_t = exit_gate(h)

Both loops are scans over one traced body, so compile time does not grow with T or L. The training
path (`step_losses`) computes each step's cross-entropy inside the loop scan under `jax.checkpoint`
and returns per-token CE [T, B, S]: the T x B x S x V logits are never held at once.

This file holds every fact about the kind: the parameter table, the loop step, the FLOP count and
the names of the released HF checkpoints (SPEC section 1).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopjax.model import attention, layers
from loopjax.model.base import HFMapping, LoopedModel, ModelKind
from loopjax.model.heads import ExitGate, gate_logits, head_param
from loopjax.model.stack import LayerStack, ParamSpec, scan_layers
from loopjax.sharding import constrain

# Per layer, given dims (D, N, K, H, F); each gains a leading "layers" axis. Norm scales take no decay.
SANDWICH_PARAMS = {
    "wq": ParamSpec(lambda D, N, K, H, F: (D, N, H), ("embed", "heads", "head_dim"), "normal", True),
    "wk": ParamSpec(lambda D, N, K, H, F: (D, K, H), ("embed", "kv_heads", "head_dim"), "normal", True),
    "wv": ParamSpec(lambda D, N, K, H, F: (D, K, H), ("embed", "kv_heads", "head_dim"), "normal", True),
    "wo": ParamSpec(lambda D, N, K, H, F: (N, H, D), ("heads", "head_dim", "embed"), "normal", True),
    "w_gate": ParamSpec(lambda D, N, K, H, F: (D, F), ("embed", "mlp"), "normal", True),
    "w_up": ParamSpec(lambda D, N, K, H, F: (D, F), ("embed", "mlp"), "normal", True),
    "w_down": ParamSpec(lambda D, N, K, H, F: (F, D), ("mlp", "embed"), "normal", True),
    "norm_attn_in": ParamSpec(lambda D, N, K, H, F: (D,), ("norm",), "ones", False),
    "norm_attn_out": ParamSpec(lambda D, N, K, H, F: (D,), ("norm",), "ones", False),
    "norm_mlp_in": ParamSpec(lambda D, N, K, H, F: (D,), ("norm",), "ones", False),
    "norm_mlp_out": ParamSpec(lambda D, N, K, H, F: (D,), ("norm",), "ones", False),
}
EMBED = ParamSpec(lambda D, V: (V, D), ("vocab", "embed"), "normal", True)
FINAL_NORM = ParamSpec(lambda D, V: (D,), ("norm",), "ones", False)


class LoopParts(NamedTuple):
  """The parameters one loop step reads: the stacked layers, the final norm and the exit gate."""
  stack: dict  # name -> [L, ...]
  final_norm_D: jax.Array
  gate_kernel_D: jax.Array
  gate_bias: jax.Array


class LoopContext(NamedTuple):
  """What stays fixed over the loop steps of one forward: RoPE tables, document mask, settings."""
  cos_BSH: jax.Array
  sin_BSH: jax.Array
  mask: attention.Mask  # documents and the attention implementation
  eps: float
  remat: str
  dtype: Any
  layer_unroll: int = 1  # model.layer_unroll


def loop_step(parts: LoopParts, h_BSD: jax.Array, context: LoopContext) -> tuple[jax.Array, jax.Array]:
  """One loop iteration, (h_BSD, gate_logits_BS): the L-layer scan, the final norm, the exit gate.

  Pure, so `run_loop` scans it with `lax.scan` and a decoder can drive it with `lax.while_loop`.
  """
  def layer_fn(p, x_BSD):
    return layers.sandwich_layer(p, x_BSD, context.cos_BSH, context.sin_BSH, context.mask,
                                 eps=context.eps, dtype=context.dtype)

  h_BSD = scan_layers(layer_fn, parts.stack, h_BSD, context.remat, context.layer_unroll)
  h_BSD = layers.rms_norm(h_BSD, parts.final_norm_D, context.eps)
  return h_BSD, gate_logits(h_BSD, parts.gate_kernel_D, parts.gate_bias)


class LoopLM(LoopedModel):
  """Ouro LoopLM. `cfg` is the `model` section of a loopjax config."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, V = cfg.hidden_size, cfg.vocab_size
    make = dict(init_std=cfg.init_std, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    self.embed = EMBED.create((D, V), **make)
    dims = (D, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim)
    self.stack = LayerStack(cfg.num_layers, SANDWICH_PARAMS, dims, **make)
    self.final_norm = FINAL_NORM.create((D, V), **make)
    self.lm_head = None if cfg.tie_embeddings else head_param(D, V, **make)
    self.exit_gate = ExitGate(D, bias_init=cfg.gate_bias_init, **make)

  def head_kernel(self) -> jax.Array:
    """[D, V]: the untied head, or the embedding's transpose when tied."""
    return self.embed[...].T if self.lm_head is None else self.lm_head[...]

  def loop_parts(self) -> LoopParts:
    return LoopParts(self.stack.stacked(), self.final_norm[...], self.exit_gate.kernel[...],
                     self.exit_gate.bias[...])

  def loop_context(self, tokens_BS, segment_ids_BS=None, positions_BS=None, balanced: int = 1) -> LoopContext:
    """RoPE tables for `positions_BS` (default 0..S-1 per row) and the document mask (tokens in the order
    `balanced` says)."""
    cfg = self.cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    if positions_BS is None:
      positions_BS = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1]), tokens_BS.shape)
    cos_BSH, sin_BSH = layers.rope_tables(positions_BS, cfg.head_dim, cfg.rope_base, dtype)
    return LoopContext(cos_BSH, sin_BSH, attention.model_mask(cfg, segment_ids_BS, balanced), cfg.norm_eps, cfg.remat,
                       dtype, cfg.layer_unroll)

  def run_loop(self, tokens_BS, read_out, *, segment_ids_BS=None, positions_BS=None,
               loop_steps: int | None = None, balanced: int = 1):
    """Runs the T loop steps: (read_out(h_BSD, head_kernel_DV) stacked over steps, gate_logits_TBS)."""
    context = self.loop_context(tokens_BS, segment_ids_BS, positions_BS, balanced)
    h_BSD = constrain(jnp.take(self.embed[...], tokens_BS, axis=0).astype(context.dtype),
                      ("batch", "seq", "act_embed"))
    parts, kernel_DV = self.loop_parts(), self.head_kernel()

    def body(h_BSD, _):
      h_BSD, gate_BS = loop_step(parts, h_BSD, context)
      return h_BSD, (read_out(h_BSD, kernel_DV), gate_BS)

    _, (per_step, gate_logits_TBS) = jax.lax.scan(body, h_BSD, length=loop_steps or self.cfg.loop_steps,
                                                  unroll=self.cfg.loop_unroll)
    return per_step, gate_logits_TBS


def forward_flops(m, seq_len: int) -> int:
  """Forward FLOPs per token: 2 x matmul params x T, plus causal attention (QK^T and AV).

  Each of the T steps runs the L-layer stack, the LM head and the gate. Causal attention per layer
  costs 2 matmuls x 2 FLOPs x (S/2 keys on average) x N*H per token.
  """
  D, F, V = m.hidden_size, m.mlp_dim, m.vocab_size
  attn_params = D * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
  matmul_params = m.num_layers * (attn_params + 3 * D * F) + D * V + D
  attn_per_layer = 2 * seq_len * m.num_heads * m.head_dim
  return m.loop_steps * (2 * matmul_params + m.num_layers * attn_per_layer)


def hf_layout(w: np.ndarray, how: str, m) -> np.ndarray:
  """One HF tensor ([out, in] for Linear weights) in loopjax's layout ([in, out], heads split out)."""
  if how == "as_is":
    return w
  if how == "transpose":
    return w.T
  if how == "row":  # a Linear(D -> 1) weight [1, D] -> [D]
    return w[0]
  if how == "scalar":
    return w.reshape(())
  if how == "split_out_heads_q":
    return w.T.reshape(m.hidden_size, m.num_heads, m.head_dim)
  if how == "split_out_heads_kv":
    return w.T.reshape(m.hidden_size, m.num_kv_heads, m.head_dim)
  if how == "split_in_heads":
    return w.T.reshape(m.num_heads, m.head_dim, m.hidden_size)
  raise ValueError(how)


def hf_unlayout(w, how: str, m):
  """The inverse of `hf_layout`: one loopjax array as the HF tensor (export). Methods only, so it also
  runs on abstract arrays (`jax.eval_shape` gives the HF shapes)."""
  if how == "as_is":
    return w
  if how == "transpose":
    return w.T
  if how == "row":
    return w.reshape(1, -1)
  if how == "scalar":
    return w.reshape(1)
  if how in ("split_out_heads_q", "split_out_heads_kv"):
    return w.reshape(m.hidden_size, -1).T
  if how == "split_in_heads":
    return w.reshape(-1, m.hidden_size).T
  raise ValueError(how)


def hf_config_extras(m) -> dict:
  """config.json keys the released Ouro code reads besides the sizes: full causal attention in every layer,
  SiLU, no RoPE scaling; early_exit_threshold 1.0 (its default: the last step unless the exit CDF hits 1)."""
  return {"hidden_act": "silu", "layer_types": ["full_attention"] * m.num_layers, "max_window_layers": m.num_layers,
          "use_sliding_window": False, "sliding_window": None, "rope_scaling": None, "attention_dropout": 0.0,
          "early_exit_threshold": 1.0, "initializer_range": m.init_std, "use_cache": True}


HF = HFMapping(
    layer_prefix="model.layers.{i}.",
    layer_tensors={
        "wq": ("self_attn.q_proj.weight", "split_out_heads_q"),
        "wk": ("self_attn.k_proj.weight", "split_out_heads_kv"),
        "wv": ("self_attn.v_proj.weight", "split_out_heads_kv"),
        "wo": ("self_attn.o_proj.weight", "split_in_heads"),
        "w_gate": ("mlp.gate_proj.weight", "transpose"),
        "w_up": ("mlp.up_proj.weight", "transpose"),
        "w_down": ("mlp.down_proj.weight", "transpose"),
        "norm_attn_in": ("input_layernorm.weight", "as_is"),
        "norm_attn_out": ("input_layernorm_2.weight", "as_is"),
        "norm_mlp_in": ("post_attention_layernorm.weight", "as_is"),
        "norm_mlp_out": ("post_attention_layernorm_2.weight", "as_is"),
    },
    tensors={
        ("embed",): ("model.embed_tokens.weight", "as_is"),
        ("final_norm",): ("model.norm.weight", "as_is"),
        ("exit_gate", "kernel"): ("model.early_exit_gate.weight", "row"),
        ("exit_gate", "bias"): ("model.early_exit_gate.bias", "scalar"),
        ("lm_head",): ("lm_head.weight", "transpose"),  # absent when tied
    },
    layout=hf_layout,
    unlayout=hf_unlayout,
    model_type="ouro",
    architecture="OuroForCausalLM",
    config_fields={"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
                   "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
                   "mlp_dim": "intermediate_size", "loop_steps": "total_ut_steps", "rope_base": "rope_theta",
                   "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings"},
    config_extras=hf_config_extras,
    # The released repository's remote code (transformers' "repo--module.Class" form); vLLM needs none.
    auto_map={"AutoConfig": "ByteDance/Ouro-1.4B--configuration_ouro.OuroConfig",
              "AutoModel": "ByteDance/Ouro-1.4B--modeling_ouro.OuroModel",
              "AutoModelForCausalLM": "ByteDance/Ouro-1.4B--modeling_ouro.OuroForCausalLM"},
)

KIND = ModelKind(name="ouro", module=LoopLM, stack_key="stack", forward_flops=forward_flops, hf=HF)
