"""The model to generate with, from a training run's checkpoint or a HF directory, and what goes with it.

A `Source` carries, besides the LoopLM, the facts generation needs that the weights do not hold: how
long a sequence the model is meant for (the cache bound), its EOS ids and its tokenizer, if known.
"""

import json
import os
from typing import NamedTuple

from loopjax.infer.inputs import GenerateError


class Source(NamedTuple):
  model: object  # a LoopLM
  max_len: int  # longest prompt + new tokens the cache may hold by default
  eos_ids: tuple[int, ...]
  tokenizer: object | None  # loopjax.data.tokenizer.ByteTokenizer / HFTokenizer
  step: int | None  # the checkpoint step (None for HF weights)
  workdir: str | None  # the run's directory (where metrics.jsonl is)
  run_config: object | None  # the run's resolved config (None for HF weights)


def _tokenizer(spec: str):
  from loopjax.data import tokenizer
  return tokenizer.load(spec) if spec else None


def from_hf(path: str, tokenizer: str = "") -> Source:
  """Released Ouro weights; the tokenizer defaults to the directory's tokenizer.json, if any."""
  from loopjax.hf import load_ouro
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise GenerateError(f"--hf {path}: no config.json there. Fix: give a HF model directory "
                        "(config.json + *.safetensors)")
  with open(config_path) as f:
    hf_config = json.load(f)
  eos = hf_config.get("eos_token_id")
  eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
  if not tokenizer and os.path.isfile(os.path.join(path, "tokenizer.json")):
    tokenizer = os.path.join(path, "tokenizer.json")
  return Source(load_ouro(path), int(hf_config.get("max_position_embeddings", 4096)), eos_ids,
                _tokenizer(tokenizer), None, None, None)


def run_tokenizer(cfg):
  """The tokenizer the run's data speaks, or None when that is not known.

  One synthetic task: its text form (`data/task_text.py`). Corpora: the byte tokenizer when `prepare`
  used it, else the tokenizer.json `prepare` kept beside them (when its hash matches the manifest),
  with the manifest's document-start id. A mixture of tasks, or of a task and corpora, has none.
  """
  from loopjax.data import pipeline, records, task_text, tasks, tokenizer
  from loopjax.hf.card import find_tokenizer
  names = pipeline.source_names(cfg.data)
  if len(names) == 1 and names[0] in tasks.TASK_NAMES:
    return task_text.TaskTokenizer(tasks.make_task(names[0], cfg.data))
  corpora = [n for n in names if n not in tasks.TASK_NAMES]
  if len(corpora) < len(names) or not all(os.path.isdir(n) for n in corpora):
    return None
  identity = records.read_manifest(corpora[0])["tokenizer"]
  if identity["kind"] == tokenizer.BYTE:
    return tokenizer.ByteTokenizer()
  path = find_tokenizer(cfg, None)
  if path is None:
    return None
  tok = tokenizer.HFTokenizer(path, bos_token="")
  tok.bos_id = identity["bos_id"]  # the id `prepare` put at every document's start, whatever its name
  return tok


def from_checkpoint(path: str, step: int | None = None, tokenizer: str = "") -> Source:
  """The parameters of a run's newest (or `step`) checkpoint, with the run's saved config."""
  import jax
  import numpy as np
  from flax import nnx

  from loopjax import checkpoint, storage
  from loopjax.config import config_from_dict
  from loopjax.train.state import model_graph
  directory = str(storage.checkpoints_dir(path))
  step, meta = checkpoint.read_meta(directory, step)
  cfg = config_from_dict(meta["config"])
  if cfg.model.kind != "ouro":
    raise GenerateError(f"--checkpoint {path}: a {cfg.model.kind!r} model has no exit gate to decode with. "
                        "Fix: give an Ouro (model.kind='ouro') run")
  params = checkpoint.restore_params(directory, step=step).items["params"]
  model = nnx.merge(model_graph(cfg.model)[0], jax.tree.map(np.asarray, params))
  return Source(model, int(cfg.train.seq_len), (), _tokenizer(tokenizer) or run_tokenizer(cfg), step,
                str(storage.run_path(directory).parent), cfg)
