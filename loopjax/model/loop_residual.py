"""Loop-Residual GPT-2 (Ng & Wang 2024, SPEC section 4): a block of layers applied n times.

    x = wte[tokens] + wpe[positions]
    x = prelude(x)                                  # optional, not looped
    for i in 1..n:  x = x + f(x)                    # f: the looped block's residual branches
    x = coda(x);  logits = ln_f(x) @ wte^T          # optional coda; tied embeddings

GPT-2 blocks carry their own residual connections (x + attn(ln(x)), then + mlp(ln(.))), so f is the
sum of those branches and `x + f(x)` is one pass of the block stack; see BUILD.md for why f is not
the whole block (that would double x every loop). Only the final state is scored: the objective is
plain next-token CE, returned as a single "step" with an exit gate that puts all mass on it.
n is `model.loop_steps`; a plain GPT-2 is n = 1.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from loopjax.model import layers
from loopjax.model.heads import StepReadouts, head_param
from loopjax.model.looped import LayerStack
from loopjax.sharding import constrain

GPT2_PARAMS = {
    "ln1_scale": (lambda D, N, H, F: (D,), ("norm",), "ones"),
    "ln1_bias": (lambda D, N, H, F: (D,), ("norm",), "zeros"),
    "wq": (lambda D, N, H, F: (D, N, H), ("embed", "heads", "head_dim"), "normal"),
    "wk": (lambda D, N, H, F: (D, N, H), ("embed", "heads", "head_dim"), "normal"),
    "wv": (lambda D, N, H, F: (D, N, H), ("embed", "heads", "head_dim"), "normal"),
    "bq": (lambda D, N, H, F: (N, H), ("heads", "head_dim"), "zeros"),
    "bk": (lambda D, N, H, F: (N, H), ("heads", "head_dim"), "zeros"),
    "bv": (lambda D, N, H, F: (N, H), ("heads", "head_dim"), "zeros"),
    "wo": (lambda D, N, H, F: (N, H, D), ("heads", "head_dim", "embed"), "normal"),
    "bo": (lambda D, N, H, F: (D,), ("norm",), "zeros"),
    "ln2_scale": (lambda D, N, H, F: (D,), ("norm",), "ones"),
    "ln2_bias": (lambda D, N, H, F: (D,), ("norm",), "zeros"),
    "w_fc": (lambda D, N, H, F: (D, F), ("embed", "mlp"), "normal"),
    "b_fc": (lambda D, N, H, F: (F,), ("mlp",), "zeros"),
    "w_proj": (lambda D, N, H, F: (F, D), ("mlp", "embed"), "normal"),
    "b_proj": (lambda D, N, H, F: (D,), ("norm",), "zeros"),
}
LN_EPS = 1e-5


class LoopResidualGPT2(StepReadouts, nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, V = cfg.hidden_size, cfg.vocab_size
    pdt = jnp.dtype(cfg.param_dtype)
    self.wte = nnx.Param(cfg.init_std * jax.random.normal(rngs.params(), (V, D), pdt),
                         logical_axes=("vocab", "embed"))
    self.wpe = nnx.Param(0.01 * jax.random.normal(rngs.params(), (cfg.max_positions, D), pdt),
                         logical_axes=("positions", "embed"))
    dims = (D, cfg.num_heads, cfg.head_dim, cfg.mlp_dim)

    def stack(n):
      return LayerStack(n, GPT2_PARAMS, dims, init_std=cfg.init_std, param_dtype=pdt, rngs=rngs) if n else None

    self.prelude = stack(cfg.prelude_layers)
    self.block = stack(cfg.num_layers)
    self.coda = stack(cfg.coda_layers)
    self.ln_f_scale = nnx.Param(jnp.ones((D,), pdt), logical_axes=("norm",))
    self.ln_f_bias = nnx.Param(jnp.zeros((D,), pdt), logical_axes=("norm",))
    self.lm_head = None if cfg.tie_embeddings else head_param(D, V, init_std=cfg.init_std, param_dtype=pdt, rngs=rngs)

  def head_kernel(self) -> jax.Array:
    return self.wte[...].T if self.lm_head is None else self.lm_head[...]

  def run_steps(self, tokens_BS, read_out, *, segment_ids_BS=None, positions_BS=None,
                loop_steps: int | None = None):
    """Only the final state is read out: (read_out(...) with a leading axis of 1, zero gate logits).

    With one "step", the exit distribution puts all mass on it and the Stage I objective is plain CE.
    """
    cfg = self.cfg
    cdt = jnp.dtype(cfg.compute_dtype)
    if positions_BS is None:
      positions_BS = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1]), tokens_BS.shape)
    mask_B1SS = layers.attention_mask(segment_ids_BS)
    x_BSD = jnp.take(self.wte[...], tokens_BS, axis=0) + jnp.take(self.wpe[...], positions_BS, axis=0)
    x_BSD = constrain(x_BSD.astype(cdt), ("batch", "seq", "act_embed"))

    def layer_fn(p, x):
      return layers.gpt2_layer(p, x, mask_B1SS, eps=LN_EPS, dtype=cdt)

    def run(stack, x):
      return x if stack is None else layers.scan_layers(layer_fn, stack.stacked(), x, cfg.remat)

    x_BSD = run(self.prelude, x_BSD)
    block = self.block.stacked()
    x_BSD, _ = jax.lax.scan(lambda x, _: (layers.scan_layers(layer_fn, block, x, cfg.remat), None), x_BSD,
                            length=loop_steps or cfg.loop_steps)
    h_BSD = layers.layer_norm(run(self.coda, x_BSD), self.ln_f_scale[...], self.ln_f_bias[...], LN_EPS)
    out = jax.tree.map(lambda y: y[None], read_out(h_BSD, self.head_kernel()))
    return out, jnp.zeros((1, *tokens_BS.shape), jnp.promote_types(cdt, jnp.float32))
