"""Released HF weights -> loopjax parameters: a model object (`load_ouro`) or sharded training params.

Torch stores Linear weights as [out, in]; loopjax keeps [in, out] with heads split out (wq [D, N, H],
wo [N, H, D]) and layers stacked on a leading axis, so each tensor is transposed, reshaped and stacked
(the kind's `HFMapping`, walked through `plan.tensor_plan`). Tensors are read one at a time and each
finished parameter is handed to `place` (to the device, or into its shards) before the next is read,
so host memory holds one parameter beyond what is placed, never the model twice.
"""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopjax.hf.config import check_model_matches, file_dtype, hf_kind, model_config_from_hf, read_hf_config
from loopjax.hf.errors import HFError
from loopjax.hf.plan import check_tensors, hf_mapping, tensor_plan
from loopjax.hf.tensorfile import TensorDir
from loopjax.train.state import model_graph


def read_hf_dir(path: str) -> tuple[dict, TensorDir]:
  """(config.json, the tensors) of an HF directory of a kind loopjax knows; every header is read and
  checked, no tensor yet."""
  if not os.path.isdir(path):
    raise HFError(f"{path} is not a directory. Fix: give the directory of an HF checkpoint (config.json and "
                  "its safetensors files)")
  hf_config = read_hf_config(path)
  hf_kind(hf_config, path)
  return hf_config, TensorDir(path)


def check_hf_dir(path: str, model_cfg) -> list[str]:
  """Everything import checks before reading a tensor: the files, config.json against `model_cfg` and
  every tensor's name and shape. Returns notes on run settings that differ from config.json."""
  hf_config, tensors = read_hf_dir(path)
  notes = check_model_matches(model_cfg, hf_config, path)
  check_tensors(tensors.shapes(), tensor_plan(model_cfg), path)
  return notes


def params_from_hf(tensors, m, place=None) -> dict:
  """loopjax's pure param dict (in `m.param_dtype`) from HF tensors (a dict or a `TensorDir`).

  Every tensor's name and shape is checked first (one error listing all problems). `place(path,
  array)` receives each finished numpy parameter and returns what the dict holds (default: it as is).
  """
  plan = tensor_plan(m)
  shapes = tensors.shapes() if isinstance(tensors, TensorDir) else {k: v.shape for k, v in tensors.items()}
  check_tensors(shapes, plan, f"{m.kind} checkpoint")
  layout, dtype = hf_mapping(m).layout, np.dtype(jnp.dtype(m.param_dtype))
  params = {}
  for path, group in itertools.groupby(plan, key=lambda p: p.path):
    group = list(group)
    if group[0].layer is None:
      value = np.asarray(layout(tensors[group[0].name], group[0].how, m), dtype)
    else:
      value = None
      for p in group:
        layer = layout(tensors[p.name], p.how, m)
        value = np.empty((len(group), *layer.shape), dtype) if value is None else value
        value[p.layer] = layer
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value if place is None else place(path, value)
    del value  # placed: the host copy goes before the next parameter is read
  return params


def sharded_hf_params(path: str, model_cfg, shardings: dict) -> dict:
  """The HF checkpoint at `path` as `model_cfg`'s params, each array created in its `shardings` entry.

  Every process reads the files and keeps only its own shards (jax.make_array_from_callback).
  """
  _, tensors = read_hf_dir(path)

  def place(param_path, host):
    sharding = shardings
    for key in param_path:
      sharding = sharding[key]
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return params_from_hf(tensors, model_cfg, place)


def load_ouro(path: str, loop_steps: int | None = None, dtype: str | None = None) -> nnx.Module:
  """A LoopLM holding the weights of the Ouro HF directory at `path`.

  `loop_steps` overrides the checkpoint's total_ut_steps (the model can also be called with any
  `loop_steps=`). `dtype` (params and compute): default the files' own (config.json's torch_dtype), so a
  bfloat16 checkpoint loads as bfloat16. Call the result on int32 token ids [B, S] to get per-step
  logits, gate logits and exit probabilities.
  """
  hf_config, tensors = read_hf_dir(path)
  m = model_config_from_hf(hf_config, loop_steps, dtype or file_dtype(hf_config))
  graphdef, _ = model_graph(m)
  return nnx.merge(graphdef, params_from_hf(tensors, m, place=lambda _, x: jnp.asarray(x)))
