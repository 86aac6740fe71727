"""Import released Ouro weights (HF directory: config.json + *.safetensors) into a loopjax LoopLM.

Torch stores Linear weights as [out, in]; loopjax keeps [in, out] with heads split out
(wq [D, N, H], wo [N, H, D]) and layers stacked on a leading axis, so each tensor is transposed,
reshaped and stacked. The names and layouts are the model kind's (`loopjax.model.ouro.HF`, SPEC
section 1); this module reads the files and builds the config.
"""

import glob
import json
import os

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from loopjax.config import default_config
from loopjax.model import model_kind
from loopjax.train.state import model_graph

def model_config_from_hf(hf_config: dict, loop_steps: int | None = None):
  """The `model` section of a loopjax config for an Ouro config.json."""
  m = default_config().model
  heads = hf_config["num_attention_heads"]
  m.kind = "ouro"
  m.vocab_size = hf_config["vocab_size"]
  m.hidden_size = hf_config["hidden_size"]
  m.num_layers = hf_config["num_hidden_layers"]
  m.num_heads = heads
  m.num_kv_heads = hf_config.get("num_key_value_heads", heads)
  m.head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
  m.mlp_dim = hf_config["intermediate_size"]
  m.loop_steps = loop_steps or hf_config.get("total_ut_steps", 4)
  m.rope_base = float(hf_config.get("rope_theta", 10_000.0))
  m.norm_eps = float(hf_config.get("rms_norm_eps", 1e-6))
  m.tie_embeddings = bool(hf_config.get("tie_word_embeddings", False))
  m.param_dtype = m.compute_dtype = "float32"
  return m


def params_from_hf(tensors: dict, m) -> dict:
  """loopjax's pure param dict (float32 numpy) from HF tensors of any float dtype.

  Walks the params the model expects, so a missing or misshapen tensor fails here, by name; the
  names and layouts are the model kind's (`ModelKind.hf`).
  """
  kind = model_kind(m.kind)
  names = kind.hf
  if names is None:
    raise ValueError(f"model kind {m.kind!r} has no HF import")

  def get(name):
    if name not in tensors:
      raise KeyError(f"{m.kind} checkpoint has no tensor {name!r} (is this a {m.kind!r} model with "
                     f"{m.num_layers} layers?)")
    return np.asarray(tensors[name], dtype=np.float32)

  def param(path: tuple, expected) -> np.ndarray:
    if path[0] == kind.stack_key:
      theirs, how = names.layer_tensors[path[1]]
      value = np.stack([names.layout(get(names.layer_prefix.format(i=i) + theirs), how, m)
                        for i in range(m.num_layers)])
    else:
      theirs, how = names.tensors[path]
      value = names.layout(get(theirs), how, m)
    if value.shape != expected.shape:
      raise ValueError(f"HF tensor {theirs!r} gives {'.'.join(path)} the shape {value.shape}, but the "
                       f"config asks for {expected.shape}")
    return value

  expected = nnx.to_pure_dict(model_graph(m)[1])
  return jax.tree_util.tree_map_with_path(lambda path, x: param(tuple(k.key for k in path), x), expected)


def load_ouro(path: str, loop_steps: int | None = None) -> nnx.Module:
  """A LoopLM holding the weights of the Ouro HF directory at `path`.

  `loop_steps` overrides the checkpoint's total_ut_steps (the model can also be called with any
  `loop_steps=`). Call the result on int32 token ids [B, S] to get per-step logits, gate logits and
  exit probabilities.
  """
  with open(os.path.join(path, "config.json")) as f:
    hf_config = json.load(f)
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {path}")
  tensors = {}
  for file in files:
    tensors.update(load_file(file))
  m = model_config_from_hf(hf_config, loop_steps)
  graphdef, _ = model_graph(m)
  return nnx.merge(graphdef, params_from_hf(tensors, m))
