"""The Ouro LoopLM: one stack of L sandwich-norm layers applied T times per token.

    h = embed(tokens)                       # once
    for t in 1..T:                          # jax.lax.scan over loop steps
        h = layers_1..L(h)                  # jax.lax.scan over stacked layer params
        h = final_norm(h)                   # after every step; the normed h feeds step t+1
        logits_t = lm_head(h); gate_t = exit_gate(h)

Both loops are scans over one traced body, so compile time does not grow with T or L. The training
path (`step_losses`) computes each step's cross-entropy inside the loop scan under `jax.checkpoint`
and returns per-token CE [T, B, S]: the T x B x S x V logits are never held at once.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from loopjax.model import layers
from loopjax.model.heads import ExitGate, StepReadouts, head_param
from loopjax.sharding import constrain

# name -> (shape given dims (D, N, K, H, F), logical axes, init); each gains a leading "layers" axis.
SANDWICH_PARAMS = {
    "wq": (lambda D, N, K, H, F: (D, N, H), ("embed", "heads", "head_dim"), "normal"),
    "wk": (lambda D, N, K, H, F: (D, K, H), ("embed", "kv_heads", "head_dim"), "normal"),
    "wv": (lambda D, N, K, H, F: (D, K, H), ("embed", "kv_heads", "head_dim"), "normal"),
    "wo": (lambda D, N, K, H, F: (N, H, D), ("heads", "head_dim", "embed"), "normal"),
    "w_gate": (lambda D, N, K, H, F: (D, F), ("embed", "mlp"), "normal"),
    "w_up": (lambda D, N, K, H, F: (D, F), ("embed", "mlp"), "normal"),
    "w_down": (lambda D, N, K, H, F: (F, D), ("mlp", "embed"), "normal"),
    "norm_attn_in": (lambda D, N, K, H, F: (D,), ("norm",), "ones"),
    "norm_attn_out": (lambda D, N, K, H, F: (D,), ("norm",), "ones"),
    "norm_mlp_in": (lambda D, N, K, H, F: (D,), ("norm",), "ones"),
    "norm_mlp_out": (lambda D, N, K, H, F: (D,), ("norm",), "ones"),
}


def _dtype(name: str):
  return jnp.dtype(name)


class LayerStack(nnx.Module):
  """L layers' parameters stacked on a leading axis, applied with one `lax.scan`."""

  def __init__(self, num_layers: int, spec: dict, dims: tuple, *, init_std: float, param_dtype, rngs: nnx.Rngs):
    self.names = tuple(spec)
    for name, (shape_fn, axes, init) in spec.items():
      shape = (num_layers, *shape_fn(*dims))
      if init == "normal":
        value = init_std * jax.random.normal(rngs.params(), shape, param_dtype)
      else:
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, param_dtype)
      setattr(self, name, nnx.Param(value, logical_axes=("layers", *axes)))

  def stacked(self) -> dict:
    return {name: getattr(self, name)[...] for name in self.names}



class LoopLM(StepReadouts, nnx.Module):
  """Ouro LoopLM. `cfg` is the `model` section of a loopjax config."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, V = cfg.hidden_size, cfg.vocab_size
    pdt = _dtype(cfg.param_dtype)
    self.embed = nnx.Param(jax.random.normal(rngs.params(), (V, D), pdt) * cfg.init_std,
                           logical_axes=("vocab", "embed"))
    dims = (D, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim)
    self.stack = LayerStack(cfg.num_layers, SANDWICH_PARAMS, dims, init_std=cfg.init_std,
                            param_dtype=pdt, rngs=rngs)
    self.final_norm = nnx.Param(jnp.ones((D,), pdt), logical_axes=("norm",))
    self.lm_head = None if cfg.tie_embeddings else head_param(D, V, init_std=cfg.init_std, param_dtype=pdt, rngs=rngs)
    self.exit_gate = ExitGate(D, init_std=cfg.init_std, param_dtype=pdt, rngs=rngs)

  def head_kernel(self) -> jax.Array:
    """[D, V]: the untied head, or the embedding's transpose when tied."""
    return self.embed[...].T if self.lm_head is None else self.lm_head[...]

  def run_steps(self, tokens_BS, read_out, *, segment_ids_BS=None, positions_BS=None,
                loop_steps: int | None = None):
    """Runs the T loop steps: (read_out(h_BSD, head_kernel_DV) stacked over steps, gate_logits_TBS)."""
    cfg = self.cfg
    cdt = _dtype(cfg.compute_dtype)
    if positions_BS is None:
      positions_BS = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1]), tokens_BS.shape)
    cos_BSH, sin_BSH = layers.rope_tables(positions_BS, cfg.head_dim, cfg.rope_base, cdt)
    mask_B1SS = layers.attention_mask(segment_ids_BS)
    h_BSD = constrain(jnp.take(self.embed[...], tokens_BS, axis=0).astype(cdt), ("batch", "seq", "act_embed"))
    final_norm_D = self.final_norm[...]
    kernel_DV = self.head_kernel()
    stacked = self.stack.stacked()

    def layer_fn(p, x_BSD):
      return layers.sandwich_layer(p, x_BSD, cos_BSH, sin_BSH, mask_B1SS, eps=cfg.norm_eps, dtype=cdt)

    def loop_body(h_BSD, _):
      h_BSD = layers.scan_layers(layer_fn, stacked, h_BSD, cfg.remat)
      h_BSD = layers.rms_norm(h_BSD, final_norm_D, cfg.norm_eps)
      return h_BSD, (read_out(h_BSD, kernel_DV), self.exit_gate(h_BSD))

    _, (per_step, gate_logits_TBS) = jax.lax.scan(loop_body, h_BSD, length=loop_steps or cfg.loop_steps)
    return per_step, gate_logits_TBS
