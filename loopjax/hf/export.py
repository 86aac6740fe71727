"""`loopjax export-hf`: a loopjax checkpoint -> an HF directory that transformers and vLLM load.

The output holds config.json (`OuroForCausalLM`, sizes, T as total_ut_steps, token ids), the weights
(model.safetensors, or shards plus model.safetensors.index.json above `max_shard_bytes`),
generation_config.json, README.md (a model card) and the tokenizer files when there is a tokenizer.
The model code is not loopjax's to ship: config.json's auto_map points at the released Ouro
repository's remote code (vLLM has the model built in).

Streaming: the parameters are read from the checkpoint's files with tensorstore (`checkpoint_files`),
each stored array once, one stored chunk of layers at a time, and each HF tensor is written as soon as
it is converted, so host memory holds about one chunk whatever the model size. The checkpoint's
checksum (a sum, see `loopjax.checkpoint`) is recomputed from what was read and must match.

Nothing appears under the output name until the export is complete: it is written to a temporary
directory beside it and renamed; a failure removes the temporary directory. The checkpoint may be on
gs:// (tensorstore reads it there). So may the output: a bucket has no rename, so the export is
written to a local temporary directory and then uploaded, config.json last, since a loader reads it
first: a prefix without config.json is an upload that did not finish.
"""

import itertools
import json
import os
import shutil
import tempfile
import time

import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from loopjax import storage
from loopjax.checkpoint import CheckpointError, read_meta
from loopjax.checkpoint.files import open_array
from loopjax.checkpoint.fingerprint import bits_sum
from loopjax.checkpoint.listing import pick_step
from loopjax.config import config_from_dict
from loopjax.hf import card
from loopjax.hf.config import CONFIG, hf_config_json
from loopjax.hf.errors import HFError
from loopjax.hf.plan import hf_mapping, tensor_plan
from loopjax.hf.tensorfile import INDEX, Entry, split_files, write_file, write_index

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
DTYPES = ("bfloat16", "float32")


def export_checkpoint(checkpoint: str, output: str, *, step: int | None = None, dtype: str | None = None,
                      tokenizer: str | None = None, overwrite: bool = False,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
  """Writes step `step` (default: the newest) of `checkpoint` (a workdir or its checkpoints directory)
  to the HF directory `output`, in `dtype` (default: the run's param_dtype). Returns a summary."""
  _check_output(output, overwrite)
  directory = str(storage.checkpoints_dir(checkpoint))
  step, meta = read_meta(directory, pick_step(directory, step, "--checkpoint"))
  cfg = config_from_dict(meta["config"])
  plan = tensor_plan(cfg.model)
  dtype = dtype or cfg.model.param_dtype
  if dtype not in DTYPES:
    raise HFError(f"cannot export in {dtype}. Fix: pass --dtype with one of {', '.join(DTYPES)}")
  tokenizer = card.find_tokenizer(cfg, tokenizer)
  ids = card.special_ids(cfg, tokenizer)
  entries = [Entry(p.name, np.dtype(jnp.dtype(dtype)), p.shape) for p in plan]
  files = split_files(entries, max_shard_bytes)
  output = os.fspath(storage.run_path(output))
  if storage.is_remote(output):
    tmp = tempfile.mkdtemp(prefix="loopjax-export-")
  else:
    tmp = f"{output}.tmp-{os.getpid()}-{time.time_ns()}"
    os.makedirs(tmp)
  try:
    sums = []
    arrays = _hf_tensors(os.path.join(directory, str(step), "params"), plan, cfg.model, entries[0].dtype, sums)
    for name, group in files.items():
      write_file(os.path.join(tmp, name), group, arrays)
    if sum(sums) % 2**32 != meta["checksums"]["params"]:
      raise CheckpointError(f"checkpoint step {step} in {directory}: its params fail their checksum. Fix: export an "
                            "earlier step (`loopjax checkpoints` lists them)")
    if len(files) > 1:
      write_index(os.path.join(tmp, INDEX), files)
    _write_json(os.path.join(tmp, CONFIG), hf_config_json(cfg, dtype, ids))
    _write_json(os.path.join(tmp, "generation_config.json"), card.generation_config(ids))
    if tokenizer:
      card.copy_tokenizer(tokenizer, tmp)
    num_params = sum(int(np.prod(p.shape)) for p in plan)
    with open(os.path.join(tmp, "README.md"), "w") as f:
      f.write(card.model_card(cfg, step=step, source=os.path.join(directory, str(step)), dtype=dtype,
                              num_params=num_params, tokenizer=tokenizer))
    _publish(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"step": step, "path": output, "files": list(files), "dtype": dtype, "params": num_params,
          "bytes": sum(e.nbytes for e in entries), "tokenizer": tokenizer}


def _hf_tensors(params_dir: str, plan, m, dtype: np.dtype, sums: list):
  """Every planned HF tensor in order, in `dtype`; appends the bit sum of everything read to `sums`.

  A layer array is read one layer at a time through a chunk cache that can hold all its decoded
  chunks, so every stored chunk is decoded once (a chunk usually spans all layers) and each read only
  copies one layer out: memory is the decoded chunks plus one layer, not two copies of the array.
  Chunks are fetched and decoded one at a time, so at most one compressed chunk is in flight.
  """
  unlayout = hf_mapping(m).unlayout
  for name, group in itertools.groupby(plan, key=lambda p: p.array_name):
    group = list(group)
    layers = group[0].layer is not None
    # A cap, not an allocation: twice the array at 8 bytes an element, so no decoded chunk is too big to keep.
    cache = 16 * len(group) * int(np.prod(group[0].shape)) if layers else 0
    context = ts.Context({"cache_pool": {"total_bytes_limit": cache},
                          "data_copy_concurrency": {"limit": 1}, "file_io_concurrency": {"limit": 1}})
    stored = open_array(params_dir, name, context)
    for p in group:
      value = stored[p.layer].read().result() if layers else stored.read().result()
      sums.append(bits_sum(value))
      yield unlayout(value, p.how, m).astype(dtype, order="C")
    del stored, context, value  # the cache goes before the next array is read


def _check_output(output: str, overwrite: bool):
  path = storage.run_path(output)
  if path.is_file():
    raise HFError(f"--output {output} is a file. Fix: give a directory path")
  if path.is_dir() and any(True for _ in path.iterdir()) and not overwrite:
    raise HFError(f"--output {output} exists and is not empty. Fix: choose a new directory, or pass --overwrite "
                  "to replace it")


def _publish(tmp: str, output: str):
  """Renames the finished export into place; an existing `output` is moved aside first, then removed.
  On a bucket: the old objects are removed, the files uploaded, config.json last; `tmp` is removed."""
  if storage.is_remote(output):
    target = storage.run_path(output)
    if target.exists():
      target.rmtree()
    storage.copy_tree(tmp, target, skip=(CONFIG,))
    storage.copy_file(os.path.join(tmp, CONFIG), target / CONFIG)
    shutil.rmtree(tmp)
    return
  old = f"{output}.old-{time.time_ns()}" if os.path.exists(output) else None
  if old:
    os.rename(output, old)
  os.rename(tmp, output)
  if old:
    shutil.rmtree(old)


def _write_json(path: str, obj: dict):
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
