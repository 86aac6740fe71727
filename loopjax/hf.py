"""Import released Ouro weights (HF directory: config.json + *.safetensors) into a loopjax LoopLM.

Torch stores Linear weights as [out, in]; loopjax keeps [in, out] with heads split out
(wq [D, N, H], wo [N, H, D]) and layers stacked on a leading axis, so each tensor is transposed,
reshaped and stacked here. Names are listed in SPEC section 1.
"""

import glob
import json
import os

import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from loopjax.config import default_config
from loopjax.train.state import model_graph

LAYER_TENSORS = {  # loopjax name -> (HF name inside model.layers.{i}., how to lay it out)
    "wq": ("self_attn.q_proj.weight", "split_out_heads_q"),
    "wk": ("self_attn.k_proj.weight", "split_out_heads_kv"),
    "wv": ("self_attn.v_proj.weight", "split_out_heads_kv"),
    "wo": ("self_attn.o_proj.weight", "split_in_heads"),
    "w_gate": ("mlp.gate_proj.weight", "transpose"),
    "w_up": ("mlp.up_proj.weight", "transpose"),
    "w_down": ("mlp.down_proj.weight", "transpose"),
    "norm_attn_in": ("input_layernorm.weight", "vector"),
    "norm_attn_out": ("input_layernorm_2.weight", "vector"),
    "norm_mlp_in": ("post_attention_layernorm.weight", "vector"),
    "norm_mlp_out": ("post_attention_layernorm_2.weight", "vector"),
}


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


def _layout(w: np.ndarray, how: str, m) -> np.ndarray:
  if how == "vector":
    return w
  if how == "transpose":
    return w.T
  if how == "split_out_heads_q":
    return w.T.reshape(m.hidden_size, m.num_heads, m.head_dim)
  if how == "split_out_heads_kv":
    return w.T.reshape(m.hidden_size, m.num_kv_heads, m.head_dim)
  if how == "split_in_heads":
    return w.T.reshape(m.num_heads, m.head_dim, m.hidden_size)
  raise ValueError(how)


def params_from_hf(tensors: dict, m) -> dict:
  """loopjax's pure param dict (float32 numpy) from HF tensors of any float dtype."""
  def get(name):
    if name not in tensors:
      raise KeyError(f"Ouro checkpoint has no tensor {name!r} (is this an Ouro model with "
                     f"{m.num_layers} layers?)")
    return np.asarray(tensors[name], dtype=np.float32)

  stack = {ours: np.stack([_layout(get(f"model.layers.{i}.{theirs}"), how, m) for i in range(m.num_layers)])
           for ours, (theirs, how) in LAYER_TENSORS.items()}
  params = {
      "embed": get("model.embed_tokens.weight"),
      "stack": stack,
      "final_norm": get("model.norm.weight"),
      "exit_gate": {"kernel": get("model.early_exit_gate.weight")[0],
                    "bias": get("model.early_exit_gate.bias").reshape(())},
  }
  if not m.tie_embeddings:
    params["lm_head"] = get("lm_head.weight").T
  return params


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
