"""Parameters declared once, and layers stacked on a leading axis and applied with one scan.

A `ParamSpec` is the one place a parameter's facts live: its shape, its logical axes (which place it
on the mesh, see `loopjax.sharding`), its init and whether AdamW decays it. Every `nnx.Param` carries
the last two as metadata, so the sharding specs and the weight-decay mask are read off the model
instead of being guessed from parameter names.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

INITS = ("normal", "ones", "zeros")

# What each policy keeps from a layer's forward pass for its backward pass (the rest is recomputed):
#   full                 nothing but the layer's input (the least memory)
#   save_matmuls         the outputs of matmuls without batch dimensions (projections, MLP)
#   save_attention_out   the attention block's output after its o-projection
#   save_attention_core  the blocked attention core's output and logsumexp, its backward's residuals
#                        ([B, S, N, H] + [B, N, S] per layer and loop step): the backward then runs the
#                        projections and MLP again but not the attention loops. Only `blocked` names them;
#                        with the other cores it is `full`.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
    "save_attention_core": jax.checkpoint_policies.save_only_these_names("attention_core"),
}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One parameter: `shape(*dims)`, logical axes, init ("normal" draws N(0, init_std^2)), decay flag."""

  shape: Callable[..., tuple[int, ...]]
  axes: tuple[str | None, ...]
  init: str
  weight_decay: bool

  def __post_init__(self):
    if self.init not in INITS:
      raise ValueError(f"unknown init {self.init!r}, expected one of {INITS}")

  def create(self, dims: tuple, *, init_std: float, param_dtype, rngs: nnx.Rngs,
             num_layers: int | None = None) -> nnx.Param:
    """The nnx.Param; with `num_layers` it gains a leading "layers" axis (one slice per layer)."""
    shape, axes = tuple(self.shape(*dims)), self.axes
    if num_layers is not None:
      shape, axes = (num_layers, *shape), ("layers", *axes)
    if self.init == "normal":
      value = init_std * jax.random.normal(rngs.params(), shape, param_dtype)
    else:
      value = (jnp.ones if self.init == "ones" else jnp.zeros)(shape, param_dtype)
    return nnx.Param(value, logical_axes=axes, weight_decay=self.weight_decay)


def create_params(module: nnx.Module, table: dict, dims: tuple, *, init_std: float, std_scale=None, **kwargs):
  """Set `module.<name>` from each ParamSpec of `table`, in table order (which fixes the RNG draws).

  `std_scale` maps some names to a factor on their init_std (e.g. depth-scaled output projections).
  """
  for name, spec in table.items():
    setattr(module, name, spec.create(dims, init_std=init_std * (std_scale or {}).get(name, 1.0), **kwargs))


class LayerStack(nnx.Module):
  """L layers' parameters stacked on a leading axis, applied with one `lax.scan`."""

  def __init__(self, num_layers: int, table: dict, dims: tuple, *, init_std: float, param_dtype,
               rngs: nnx.Rngs, std_scale=None):
    self.names = tuple(table)
    create_params(self, table, dims, init_std=init_std, std_scale=std_scale, param_dtype=param_dtype, rngs=rngs,
                  num_layers=num_layers)

  def stacked(self) -> dict:
    """name -> [L, ...] array: the pytree `scan_layers` slices one layer at a time."""
    return {name: getattr(self, name)[...] for name in self.names}


def remat(fn, policy: str):
  """Wrap a layer body for rematerialisation under a named policy ('none' disables it)."""
  if policy == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)


def scan_layers(layer_fn, stacked_params: dict, x_BSD: jax.Array, remat_policy: str, unroll: int = 1) -> jax.Array:
  """Apply `layer_fn(params_l, x)` for each slice l of the stacked [L, ...] params with one scan.

  Scanning keeps the compiled program the size of one layer whatever L is. `unroll` > 1 (model.layer_unroll)
  trades that for speed where the saved activations' stacking costs more than it saves (small models on CPU).
  """
  body = remat(lambda x, p: (layer_fn(p, x), None), remat_policy)
  x_BSD, _ = jax.lax.scan(body, x_BSD, stacked_params, unroll=unroll)
  return x_BSD
