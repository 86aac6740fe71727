"""The outer training loop: config -> mesh -> sharded state -> data -> jitted steps -> metrics.

Effects live here (iterators, device transfers, files, progress bars); the step it drives is pure.
"""

import dataclasses
import logging
import time

import jax
import numpy as np
from jax.sharding import Mesh

from loopjax import config as config_lib
from loopjax import data as data_lib
from loopjax import metrics as metrics_lib
from loopjax import sharding
from loopjax.train import state as state_lib
from loopjax.train import step as step_lib
from loopjax.train.optim import make_optimizer

log = logging.getLogger("loopjax")


@dataclasses.dataclass
class Trainer:
  """Everything a run needs, built once from a validated config."""
  cfg: object
  mesh: Mesh
  graphdef: object
  state: state_lib.TrainState
  state_shardings: state_lib.TrainState
  train_step: object  # jitted (state, batch) -> (state, metrics)
  data_iter: object
  flops_per_token: float
  peak_flops: float


def setup(cfg) -> Trainer:
  """Validate, build the mesh, initialise the sharded state and the data iterator. No compile yet."""
  mesh_shape = config_lib.validate(cfg, jax.device_count())
  mesh = sharding.make_mesh(mesh_shape)
  optimizer = make_optimizer(cfg.optim, cfg.train.steps)
  graphdef, _ = state_lib.model_graph(cfg.model)
  state, shardings = state_lib.init_train_state(cfg.model, optimizer, mesh, cfg.train.seed)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(cfg, graphdef, optimizer), shardings, mesh)
  data_iter = data_lib.make_train_iterator(
      cfg.data, seq_len=cfg.train.seq_len, global_batch=cfg.train.batch_size, seed=cfg.train.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  return Trainer(cfg, mesh, graphdef, state, shardings, train_step, data_iter,
                 metrics_lib.train_flops_per_token(cfg.model, cfg.train.seq_len), metrics_lib.peak_flops())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Process-local numpy rows -> one global jax.Array per key, sharded on the batch axes."""
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local_batch[k]))
          for k in step_lib.BATCH_KEYS}


def train(cfg, workdir: str) -> dict:
  """Runs `cfg.train.steps` steps; returns the last logged metrics."""
  trainer = setup(cfg)
  is_writer = jax.process_index() == 0
  writer = metrics_lib.MetricWriter(workdir, enabled=is_writer)
  total_steps = cfg.train.steps
  progress = None
  if is_writer and cfg.train.progress:
    from tqdm import tqdm
    progress = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)
  last = {}
  state = trainer.state
  with jax.set_mesh(trainer.mesh):
    batch = global_batch(next(trainer.data_iter), trainer.mesh)
    compile_start = time.perf_counter()
    compiled_step = trainer.train_step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - compile_start
    log.info("compiled the train step in %.1f s", compile_seconds)
    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
    for step in range(int(state.step), total_steps):
      if batch is None:
        batch = global_batch(next(trainer.data_iter), trainer.mesh)
      state, step_metrics = compiled_step(state, batch)
      batch = None
      window_tokens += cfg.train.batch_size * cfg.train.seq_len
      window_steps += 1
      if progress is not None:
        progress.update(1)
      done = step + 1
      if done % cfg.train.log_every == 0 or done == total_steps:
        last = metrics_lib.to_python(step_metrics)  # blocks until the step is finished
        elapsed = time.perf_counter() - window_start
        last["tokens_per_sec"] = window_tokens / elapsed
        last["step_time"] = elapsed / window_steps
        last["mfu"] = last["tokens_per_sec"] * trainer.flops_per_token / trainer.peak_flops
        last["compile_seconds"] = compile_seconds
        writer.write(done, last)
        if progress is not None:
          progress.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_sec']:.0f}")
        window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
  if progress is not None:
    progress.close()
  writer.close()
  return last
