"""Layer duplication (SPEC section 3): grow the shared stack from L to L' layers by copying layers.

Ouro's 2.6B model is the 1.4B model with its 24-layer stack doubled to 48 at the start of stage 1b.
Output layer j is a copy of input layer `index[j]`, where `index` comes from the mapping:

  interleave   0,0,1,1,...,L-1,L-1     (each layer repeated k = L'/L times in place)
  stack        0..L-1, 0..L-1, ...     (the whole stack repeated k times)
  "i,j,..."    an explicit list of L' source layers, each in [0, L)

Layer parameters are stacked on a leading "layers" axis (one array per parameter name under the
model kind's `stack_key`, see `loopjax.model.ModelKind`; Loop-Residual's prelude and coda are not
looped and keep their size), so duplication is one `take` along axis 0 per array; every other array is
untouched. Adam's moments live in trees shaped like the params, so the same rule applies to them
(a leaf is a layer array when its parent key is the stack key).

In memory (`upscale_state`) the take runs under `jax.jit` with the new state's `out_shardings`: the
"layers" axis is never sharded, so each device builds its own shards of the output from its own
shards of the input and no host ever holds the whole model. Checkpoint to checkpoint (the CLI) see
`loopjax.upscale_checkpoint`, which streams one array at a time.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.train.optim import fresh_state_at

MAPPINGS = ("interleave", "stack")
MOMENTS = ("duplicate", "reset")


class UpscaleError(ValueError):
  """An upscale that cannot work; the message says why and what to change."""


def layer_index(old_layers: int, new_layers: int, mapping: str | Sequence[int]) -> np.ndarray:
  """The source layer of each output layer; UpscaleError (problem and fix) when it cannot work."""
  if new_layers < 1 or old_layers < 1:
    raise UpscaleError(f"layer counts must be >= 1 (from {old_layers} to {new_layers}). Fix: give positive "
                     "layer counts")
  if isinstance(mapping, str) and mapping in MAPPINGS:
    if new_layers % old_layers:
      raise UpscaleError(f"mapping {mapping!r} needs the new layer count to be a multiple of the old one, "
                       f"got {old_layers} -> {new_layers}. Fix: use {2 * old_layers} (or another multiple) "
                       "layers, or an explicit index list")
    k = new_layers // old_layers
    return np.repeat(np.arange(old_layers), k) if mapping == "interleave" else np.tile(np.arange(old_layers), k)
  try:
    index = np.asarray([int(i) for i in (mapping.split(",") if isinstance(mapping, str) else mapping)])
  except ValueError:
    raise UpscaleError(f"mapping {mapping!r} is neither one of {MAPPINGS} nor a comma-separated list of layer "
                     f"indices. Fix: use 'interleave', 'stack' or e.g. '0,0,1,1'") from None
  if len(index) != new_layers:
    raise UpscaleError(f"the index list has {len(index)} entries but the model gets {new_layers} layers. "
                     f"Fix: give exactly {new_layers} source layers")
  if index.min() < 0 or index.max() >= old_layers:
    raise UpscaleError(f"the index list refers to layer {index.min() if index.min() < 0 else index.max()}, "
                     f"but the source model has layers 0..{old_layers - 1}. Fix: use indices in that range")
  return index


def is_layer_array(names: Sequence[str], stack_key: str) -> bool:
  """True for a stacked layer array: a leaf whose parent key is the stack key (params or moments)."""
  return len(names) >= 2 and names[-2] == stack_key


def _key_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def upscale_tree(tree, index, stack_key: str):
  """`tree` with every layer array replaced by its rows `index` (a pure function; jit it)."""
  index = jnp.asarray(index)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.take(x, index, axis=0) if is_layer_array(_key_names(path), stack_key) else x, tree)


def upscale_state(state, index, *, stack_key: str, moments: str, optimizer, shardings):
  """The TrainState with its stack upscaled, built directly in `shardings` (the new model's).

  moments="duplicate" copies Adam's moments (and keeps the step counts) with their layers;
  "reset" starts the optimizer afresh for the new parameters (its LR schedule still at `state.step`).
  """
  if moments not in MOMENTS:
    raise UpscaleError(f"moments={moments!r} is not one of {MOMENTS}")

  def grow(state):
    params = upscale_tree(state.params, index, stack_key)
    opt_state = (upscale_tree(state.opt_state, index, stack_key) if moments == "duplicate"
                 else fresh_state_at(optimizer, params, state.step))
    return type(state)(state.step, params, opt_state)

  return jax.jit(grow, out_shardings=shardings)(state)
