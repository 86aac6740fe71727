"""Loop-Residual GPT-2 (Ng & Wang 2024, SPEC section 4): a block of layers applied n times.

    x = wte[tokens] + wpe[positions]
    x = prelude(x)                                  # optional, not looped
    for i in 1..n:  x = x + f(x)                    # f: the looped block's residual branches
    x = coda(x);  logits = ln_f(x) @ wte^T          # optional coda; tied embeddings

GPT-2 blocks carry their own residual connections (x + attn(ln(x)), then + mlp(ln(.))), so f is the
sum of those branches and `x + f(x)` is one pass of the block stack; see BUILD.md for why f is not
the whole block (that would double x every loop). Only the final state is scored: the objective is
plain next-token CE, returned as a single "step" with an exit gate that puts all mass on it.
n is `model.loop_steps`; a plain GPT-2 is n = 1. LayerNorm scales and all biases take no weight decay.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from loopjax.model import attention, layers
from loopjax.model.base import LoopedModel, ModelKind
from loopjax.model.heads import head_param
from loopjax.model.stack import LayerStack, ParamSpec, create_params, scan_layers
from loopjax.sharding import constrain

# Per layer, given dims (D, N, H, F); each gains a leading "layers" axis.
GPT2_PARAMS = {
    "ln1_scale": ParamSpec(lambda D, N, H, F: (D,), ("norm",), "ones", False),
    "ln1_bias": ParamSpec(lambda D, N, H, F: (D,), ("norm",), "zeros", False),
    "wq": ParamSpec(lambda D, N, H, F: (D, N, H), ("embed", "heads", "head_dim"), "normal", True),
    "wk": ParamSpec(lambda D, N, H, F: (D, N, H), ("embed", "heads", "head_dim"), "normal", True),
    "wv": ParamSpec(lambda D, N, H, F: (D, N, H), ("embed", "heads", "head_dim"), "normal", True),
    "bq": ParamSpec(lambda D, N, H, F: (N, H), ("heads", "head_dim"), "zeros", False),
    "bk": ParamSpec(lambda D, N, H, F: (N, H), ("heads", "head_dim"), "zeros", False),
    "bv": ParamSpec(lambda D, N, H, F: (N, H), ("heads", "head_dim"), "zeros", False),
    "wo": ParamSpec(lambda D, N, H, F: (N, H, D), ("heads", "head_dim", "embed"), "normal", True),
    "bo": ParamSpec(lambda D, N, H, F: (D,), ("norm",), "zeros", False),
    "ln2_scale": ParamSpec(lambda D, N, H, F: (D,), ("norm",), "ones", False),
    "ln2_bias": ParamSpec(lambda D, N, H, F: (D,), ("norm",), "zeros", False),
    "w_fc": ParamSpec(lambda D, N, H, F: (D, F), ("embed", "mlp"), "normal", True),
    "b_fc": ParamSpec(lambda D, N, H, F: (F,), ("mlp",), "zeros", False),
    "w_proj": ParamSpec(lambda D, N, H, F: (F, D), ("mlp", "embed"), "normal", True),
    "b_proj": ParamSpec(lambda D, N, H, F: (D,), ("norm",), "zeros", False),
}
# Given dims (D, V, P) with P = max_positions; GPT-2 draws wpe with std 0.01 (see WPE_STD).
WTE = ParamSpec(lambda D, V, P: (V, D), ("vocab", "embed"), "normal", True)
WPE = ParamSpec(lambda D, V, P: (P, D), ("positions", "embed"), "normal", True)
LN_F_PARAMS = {
    "ln_f_scale": ParamSpec(lambda D, V, P: (D,), ("norm",), "ones", False),
    "ln_f_bias": ParamSpec(lambda D, V, P: (D,), ("norm",), "zeros", False),
}
WPE_STD = 0.01
LN_EPS = 1e-5
RESIDUAL_OUTPUTS = ("wo", "w_proj")  # the projections that write into the residual stream


def output_init_scale(cfg) -> float:
  """The factor on init_std of RESIDUAL_OUTPUTS: 1, or 1/sqrt(2 x layer applications) with depth_scaled_init.

  GPT-2 scales them by 1/sqrt(2 x layers) so the residual stream's variance stays bounded in depth. A
  looped block adds its branches again on every loop, so the depth that counts is the unrolled one;
  without it the looped stream grows linearly with the loop count (experiments/RESULTS.md, claim d).
  """
  if not cfg.depth_scaled_init:
    return 1.0
  return (2 * (cfg.prelude_layers + cfg.num_layers * cfg.loop_steps + cfg.coda_layers)) ** -0.5


class LoopResidualGPT2(LoopedModel):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, V = cfg.hidden_size, cfg.vocab_size
    make = dict(param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    top_dims = (D, V, cfg.max_positions)
    self.wte = WTE.create(top_dims, init_std=cfg.init_std, **make)
    self.wpe = WPE.create(top_dims, init_std=WPE_STD, **make)
    dims = (D, cfg.num_heads, cfg.head_dim, cfg.mlp_dim)
    scale = {name: output_init_scale(cfg) for name in RESIDUAL_OUTPUTS}

    def stack(n):
      return LayerStack(n, GPT2_PARAMS, dims, init_std=cfg.init_std, std_scale=scale, **make) if n else None

    self.prelude = stack(cfg.prelude_layers)
    self.block = stack(cfg.num_layers)
    self.coda = stack(cfg.coda_layers)
    create_params(self, LN_F_PARAMS, top_dims, init_std=cfg.init_std, **make)
    self.lm_head = None if cfg.tie_embeddings else head_param(D, V, init_std=cfg.init_std, **make)

  def head_kernel(self) -> jax.Array:
    return self.wte[...].T if self.lm_head is None else self.lm_head[...]

  def run_loop(self, tokens_BS, read_out, *, segment_ids_BS=None, positions_BS=None,
               loop_steps: int | None = None, balanced: int = 1):
    """Only the final state is read out: (read_out(...) with a leading axis of 1, zero gate logits).

    With one "step", the exit distribution puts all mass on it and the Stage I objective is plain CE.
    """
    cfg = self.cfg
    cdt = jnp.dtype(cfg.compute_dtype)
    if positions_BS is None:
      positions_BS = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1]), tokens_BS.shape)
    mask = attention.model_mask(cfg, segment_ids_BS, balanced)
    x_BSD = jnp.take(self.wte[...], tokens_BS, axis=0) + jnp.take(self.wpe[...], positions_BS, axis=0)
    x_BSD = constrain(x_BSD.astype(cdt), ("batch", "seq", "act_embed"))

    def layer_fn(p, x):
      return layers.gpt2_layer(p, x, mask, eps=LN_EPS, dtype=cdt)

    def run(stack, x):
      return x if stack is None else scan_layers(layer_fn, stack.stacked(), x, cfg.remat, cfg.layer_unroll)

    x_BSD = run(self.prelude, x_BSD)
    block = self.block.stacked()
    x_BSD, _ = jax.lax.scan(lambda x, _: (scan_layers(layer_fn, block, x, cfg.remat, cfg.layer_unroll), None),
                            x_BSD, length=loop_steps or cfg.loop_steps, unroll=cfg.loop_unroll)
    h_BSD = layers.layer_norm(run(self.coda, x_BSD), self.ln_f_scale[...], self.ln_f_bias[...], LN_EPS)
    out = jax.tree.map(lambda y: y[None], read_out(h_BSD, self.head_kernel()))
    return out, jnp.zeros((1, *tokens_BS.shape), jnp.promote_types(cdt, jnp.float32))


def forward_flops(m, seq_len: int) -> int:
  """Forward FLOPs per token: prelude and coda once, the looped block T times, the head once.

  A layer's matmuls hold 4 D^2 (attention, N H = D) + 2 D F (MLP) parameters; causal attention adds
  2 matmuls x 2 FLOPs x (S/2 keys on average) x N H.
  """
  D, F = m.hidden_size, m.mlp_dim
  layer = 2 * (4 * D * D + 2 * D * F) + 2 * seq_len * m.num_heads * m.head_dim
  return layer * (m.loop_steps * m.num_layers + m.prelude_layers + m.coda_layers) + 2 * D * m.vocab_size


KIND = ModelKind(name="loop_residual", module=LoopResidualGPT2, stack_key="block", forward_flops=forward_flops,
                 exit_gate=False)
