"""Which HF tensor each loopjax parameter is, with both shapes: the one table import and export walk.

Built from the model kind's `HFMapping` and the model's abstract parameters (nothing is allocated).
Stacked layer arrays give one HF tensor per layer, listed consecutively, so export reads each stored
array once and import fills one stacked array at a time.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from loopjax.hf.errors import HFError
from loopjax.model import model_kind
from loopjax.train.state import model_graph


@dataclasses.dataclass(frozen=True)
class Planned:
  name: str  # the HF tensor's name
  path: tuple[str, ...]  # the loopjax parameter's path in the pure param dict
  layer: int | None  # index on the stacked axis, for a layer tensor
  how: str  # the layout (HFMapping.layout / unlayout)
  shape: tuple[int, ...]  # the HF tensor's shape

  @property
  def array_name(self) -> str:
    """The parameter's name in a checkpoint's files (the dotted tree path)."""
    return ".".join(self.path)


def hf_mapping(model_cfg):
  """The kind's HFMapping; HFError for a kind without an HF format (Loop-Residual)."""
  mapping = model_kind(model_cfg.kind).hf
  if mapping is None:
    raise HFError(f"model kind {model_cfg.kind!r} has no Hugging Face format (transformers and vLLM have no "
                  "model for it). Fix: export an Ouro run (model.kind='ouro')")
  return mapping


def tensor_plan(model_cfg) -> list[Planned]:
  """Every HF tensor of the model, grouped by the loopjax parameter it belongs to."""
  m, mapping = model_cfg, hf_mapping(model_cfg)
  stack_key = model_kind(m.kind).stack_key
  leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(model_graph(m)[1]))[0]
  plan = []
  for keys, leaf in leaves:
    path = tuple(str(k.key) for k in keys)
    if path[0] == stack_key:
      theirs, how = mapping.layer_tensors[path[1]]
      shape = _hf_shape(mapping, leaf.shape[1:], how, m)
      plan += [Planned(mapping.layer_prefix.format(i=i) + theirs, path, i, how, shape) for i in range(leaf.shape[0])]
    else:
      theirs, how = mapping.tensors[path]
      plan.append(Planned(theirs, path, None, how, _hf_shape(mapping, leaf.shape, how, m)))
  return plan


def _hf_shape(mapping, shape, how: str, m) -> tuple[int, ...]:
  out = jax.eval_shape(lambda w: mapping.unlayout(w, how, m), jax.ShapeDtypeStruct(tuple(shape), jnp.float32))
  return tuple(out.shape)


def check_tensors(shapes: dict, plan: list[Planned], where: str):
  """One HFError naming every planned tensor that `shapes` (HF name -> shape) lacks or shapes otherwise."""
  problems = []
  for p in plan:
    if p.name not in shapes:
      problems.append(f"{p.name} missing")
    elif tuple(shapes[p.name]) != p.shape:
      problems.append(f"{p.name} is {tuple(shapes[p.name])}, the config needs {p.shape}")
  if problems:
    shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
    raise HFError(f"{where}: {len(problems)} tensor(s) do not fit the model config: {shown}. Fix: use the config "
                  "the checkpoint was saved with (config.json's sizes) or the checkpoint that config describes")
