"""The model a benchmark runs: parameters placed on a mesh, and the facts text requests need with them.

Three ways in, one shape out: a training run's checkpoint (local or gs://) or a HF Ouro directory
(both through `loopjax.infer.load`, the same loading `loopjax generate` uses), or a training run's live
parameters (the in-training hook, `sweep.training_sweep`: no checkpoint round trip, the trainer's own
mesh and shardings).
Text needs a tokenizer, so a model without a known one is refused here, before anything compiles.
"""

from typing import NamedTuple

import jax
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from loopjax import sharding
from loopjax.evaluation.harness import HarnessError
from loopjax.train.state import model_graph


class HarnessModel(NamedTuple):
  model_cfg: object  # the `model` config section (its loop_steps is the trained T)
  params: dict | None  # pure dict of jax.Arrays on `mesh` (None in a training sweep: given per call)
  mesh: object
  tokenizer: object  # ByteTokenizer / HFTokenizer / TaskTokenizer: encode_batch, decode, bos_id
  max_len: int  # the longest sequence (context + continuation or new tokens) the model is run on
  eos_ids: tuple[int, ...]

  def replicated(self):
    """The LoopLM with these parameters whole on every device of the mesh, for the decoder (which is not
    sharded): a training step's FSDP-sharded parameters are gathered. Use it under `jax.set_mesh(mesh)`,
    as the scorer runs, since a training step's mesh may be the context."""
    params = jax.device_put(self.params, NamedSharding(self.mesh, PartitionSpec()))
    return nnx.merge(model_graph(self.model_cfg)[0], params)


def data_parallel_mesh():
  """Every device on the data axis: each holds the whole model, and request batches split over them."""
  return sharding.make_mesh((jax.device_count(), 1, 1, 1))


NO_TOKENIZER = "no tokenizer is known for this model, and benchmarks are text"


def load_source(*, checkpoint: str = "", hf: str = "", step: int | None = None, tokenizer: str = ""):
  """`loopjax.infer.load.Source` of a run's checkpoint (newest or `step`) or a HF directory, with a tokenizer."""
  from loopjax.infer import load as infer_load
  if bool(checkpoint) == bool(hf):
    raise HarnessError("the model: give exactly one of checkpoint=WORKDIR and hf=DIR. Fix: e.g. --model_args "
                       "checkpoint=runs/smoke (or loopjax eval --checkpoint / --hf)")
  source = (infer_load.from_checkpoint(checkpoint, step, tokenizer) if checkpoint
            else infer_load.from_hf(hf, tokenizer))
  if source.tokenizer is None:
    raise HarnessError(f"{checkpoint or hf}: {NO_TOKENIZER} (its run trained on data without one, or the HF "
                       "directory has no tokenizer.json). Fix: name it: 'byte' or a tokenizer.json path "
                       "(--tokenizer, or tokenizer=... in --model_args)")
  return source


def from_source(source, max_length: int = 0) -> HarnessModel:
  """The source's parameters replicated over all devices; `max_length` (0: the source's) bounds a row.

  A run saves the attention core it resolved where it trained (`native` on CPU, `splash` on TPU, ...);
  here it is `auto` again, so a checkpoint is evaluated with what this machine runs.
  """
  model_cfg = ml_collections.ConfigDict(source.model.cfg.as_configdict())  # the model keeps it frozen
  model_cfg.attention = "auto"
  mesh = data_parallel_mesh()
  params = jax.device_put(nnx.to_pure_dict(nnx.state(source.model, nnx.Param)),
                          NamedSharding(mesh, PartitionSpec()))
  return HarnessModel(model_cfg, params, mesh, source.tokenizer, int(max_length or source.max_len), source.eos_ids)


def run_tokenizer_or_fail(cfg):
  """The training run's tokenizer (`infer.load.run_tokenizer`); refused at start-up when it has none."""
  from loopjax.infer.load import run_tokenizer
  tokenizer = run_tokenizer(cfg)
  if tokenizer is None:
    raise HarnessError(f"config.eval.harness_tasks: {NO_TOKENIZER} (the run's data is a mixture of tasks, or "
                       "corpora whose tokenizer.json is not beside them). Fix: train on one synthetic task or "
                       "on corpora made by `loopjax prepare`, or unset eval.harness_tasks and run `loopjax eval "
                       "--harness --tokenizer ...` on the checkpoints")
  return tokenizer
