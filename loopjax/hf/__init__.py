"""Hugging Face interop for released Ouro checkpoints, both ways.

  importer.py   HF directory -> a model (`load_ouro`) or sharded training params (`init.from_hf`,
                `loopjax import-hf`)
  export.py     a loopjax checkpoint -> an HF directory transformers and vLLM load (`loopjax export-hf`)
  config.py     config.json <-> the `model` config; plan.py: which HF tensor each parameter is
  tensorfile.py safetensors read and written one tensor at a time; card.py: model card, tokenizer, token ids

The names, layouts and config keys are the model kind's (`loopjax.model.model_kind(kind).hf`).
"""

from loopjax.hf.config import model_config_from_hf
from loopjax.hf.errors import HFError
from loopjax.hf.importer import load_ouro, params_from_hf

__all__ = ["HFError", "load_ouro", "model_config_from_hf", "params_from_hf"]
