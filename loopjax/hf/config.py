"""config.json <-> a loopjax `model` config, both ways through the model kind's `HFMapping.config_fields`.

Import reads the sizes into a model config, or checks a run's model config against them: every field
that decides a tensor's shape or the function computed must match. `loop_steps` and `rope_base` may
differ (FREE_FIELDS): a run may continue at another T or RoPE base than the released files name, as
Ouro's own recipe does between stages; the difference is reported, not refused. Export writes the
same keys back, plus the kind's other keys (`config_extras`) and where transformers finds the code.
"""

import json
import os

from loopjax.config import ConfigError, default_config
from loopjax.hf.errors import HFError
from loopjax.model import KINDS

CONFIG = "config.json"
FREE_FIELDS = ("loop_steps", "rope_base")
# config.json keys that may be absent, and the HF convention that stands for them.
_DERIVED = {"num_key_value_heads": lambda c: c["num_attention_heads"],
            "head_dim": lambda c: c["hidden_size"] // c["num_attention_heads"]}
FILE_DTYPES = ("float32", "bfloat16", "float16")


def read_hf_config(path: str) -> dict:
  """The config.json of the HF directory `path`; HFError naming the file and the fix."""
  file = os.path.join(path, CONFIG)
  if not os.path.isfile(file):
    raise HFError(f"{file} does not exist. Fix: give the directory of an HF checkpoint (config.json and "
                  "its safetensors files)")
  try:
    with open(file) as f:
      return json.load(f)
  except ValueError as e:
    raise HFError(f"{file} is not JSON ({e}). Fix: download or copy the checkpoint again") from None


def hf_kind(hf_config: dict, path: str = "") -> tuple[str, object]:
  """(loopjax kind name, its HFMapping) for config.json's model_type."""
  known = {kind.hf.model_type: kind for kind in KINDS.values() if kind.hf is not None}
  model_type = hf_config.get("model_type")
  if model_type not in known:
    raise HFError(f"{os.path.join(path, CONFIG)} has model_type {model_type!r}; loopjax imports "
                  f"{', '.join(map(repr, known))}. Fix: give the directory of a released Ouro checkpoint")
  return known[model_type].name, known[model_type].hf


def file_dtype(hf_config: dict) -> str:
  """The dtype the files were saved in (transformers' torch_dtype, newer "dtype"); float32 if unknown."""
  dtype = hf_config.get("torch_dtype") or hf_config.get("dtype")
  return dtype if dtype in FILE_DTYPES else "float32"


def model_config_from_hf(hf_config: dict, loop_steps: int | None = None, dtype: str = "float32"):
  """The `model` section of a loopjax config for an HF config.json (params and compute in `dtype`)."""
  name, mapping = hf_kind(hf_config)
  m = default_config().model
  m.kind = name
  for ours, theirs in mapping.config_fields.items():
    value = hf_config.get(theirs)
    if value is None and theirs in _DERIVED:
      value = _DERIVED[theirs](hf_config)
    if value is not None:
      m[ours] = type(m[ours])(value)
    elif ours not in FREE_FIELDS + ("norm_eps", "tie_embeddings"):  # those have the HF defaults
      raise HFError(f"config.json has no {theirs!r}. Fix: use the config.json the checkpoint was saved with")
  m.loop_steps = loop_steps or m.loop_steps
  m.param_dtype = m.compute_dtype = dtype
  return m


def check_model_matches(model_cfg, hf_config: dict, path: str) -> list[str]:
  """Raises one ConfigError naming every model field that differs from config.json; returns notes on the
  FREE_FIELDS that differ (the run's value is used)."""
  name, mapping = hf_kind(hf_config, path)
  if model_cfg.kind != name:
    raise ConfigError(f"config.model.kind: {model_cfg.kind!r}, but {os.path.join(path, CONFIG)} holds an {name!r} "
                      f"model. Fix: --config.model.kind={name}")
  theirs = model_config_from_hf(hf_config)
  differ = [(ours, key) for ours, key in mapping.config_fields.items() if model_cfg[ours] != theirs[ours]]
  wrong = [(ours, key) for ours, key in differ if ours not in FREE_FIELDS]
  if wrong:
    listed = "; ".join(f"model.{ours}={model_cfg[ours]} but {key}={theirs[ours]}" for ours, key in wrong)
    fix = " ".join(f"--config.model.{ours}={theirs[ours]}" for ours, _ in wrong)
    raise ConfigError(f"config.model: does not match {os.path.join(path, CONFIG)}: {listed}. Fix: {fix} "
                      "(or a config file with the checkpoint's sizes)")
  return [f"model.{ours}={model_cfg[ours]} is used; the HF checkpoint says {key}={theirs[ours]}"
          for ours, key in differ]


def hf_config_json(cfg, dtype: str, special_ids: dict) -> dict:
  """config.json for a run's config `cfg`: sizes, the kind's other keys, auto_map, dtype, token ids.

  max_position_embeddings is the sequence length the checkpoint was trained at (RoPE sets no limit).
  """
  m = cfg.model
  mapping = KINDS[m.kind].hf
  out = {"architectures": [mapping.architecture], "model_type": mapping.model_type, "auto_map": dict(mapping.auto_map)}
  out.update({key: m[ours] for ours, key in mapping.config_fields.items()})
  out.update(mapping.config_extras(m))
  out.update(max_position_embeddings=cfg.train.seq_len, torch_dtype=dtype, **special_ids)
  return dict(sorted(out.items()))
