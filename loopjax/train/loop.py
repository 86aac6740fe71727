"""The outer training loop: config -> mesh -> sharded state (fresh or resumed) -> jitted steps -> metrics.

Effects live here (iterators, device transfers, files, signals, checkpoints); the step it drives is pure.

Resume: `train` restores the newest complete checkpoint under WORKDIR/checkpoints (params, optimizer
state, data-iterator position, loop counters) and continues; on CPU the continuation is bitwise the
uninterrupted run. Lines in metrics.jsonl after the restored step (logged by the run that died) are
dropped first, so the file holds each step once.

Preemption: SIGTERM or SIGINT finishes the step in flight, saves, waits for the save and returns
normally (exit code 0). With several processes JAX's preemption sync point picks the step, so all
processes save the same one; SIGINT is forwarded as SIGTERM to reach it.
"""

import dataclasses
import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from loopjax import checkpoint as checkpoint_lib
from loopjax import config as config_lib
from loopjax import data as data_lib
from loopjax import distributed
from loopjax import evaluation
from loopjax import metrics as metrics_lib
from loopjax import sharding
from loopjax.train import state as state_lib
from loopjax.train import step as step_lib
from loopjax.train.optim import make_optimizer

log = logging.getLogger("loopjax")


class NonFiniteLossError(RuntimeError):
  """train.nan_policy == "stop" and a step had a NaN/Inf loss or gradient norm."""


@dataclasses.dataclass
class Trainer:
  """Everything a run needs, built once from a validated config. No train state is allocated yet."""
  cfg: object
  mesh: Mesh
  graphdef: object
  optimizer: object
  abstract_state: state_lib.TrainState  # ShapeDtypeStructs carrying the target shardings
  state_shardings: state_lib.TrainState
  train_step: object  # jitted (state, batch) -> (state, metrics)
  data_iter: object
  flops_per_token: float
  peak_flops: float
  evaluator: evaluation.Evaluator | None  # when eval.every_steps > 0

  def init_state(self) -> state_lib.TrainState:
    return state_lib.init_train_state(self.cfg.model, self.optimizer, self.mesh, self.cfg.train.seed)[0]


def setup(cfg) -> Trainer:
  """Validate, build the mesh, the state's shardings and the data iterator. No compile yet."""
  mesh_shape = config_lib.validate(cfg, jax.device_count())
  mesh = sharding.make_mesh(mesh_shape)
  optimizer = make_optimizer(cfg.optim, cfg.train.steps)
  graphdef, _ = state_lib.model_graph(cfg.model)
  shardings = state_lib.state_shardings(cfg.model, optimizer, mesh)
  abstract = checkpoint_lib.abstract_like(
      jax.eval_shape(state_lib.init_fn(cfg.model, optimizer), jax.random.key(0)), shardings)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(cfg, graphdef, optimizer), shardings, mesh)
  data_iter = data_lib.make_train_iterator(
      cfg.data, seq_len=cfg.train.seq_len, global_batch=cfg.train.batch_size, seed=cfg.train.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  evaluator = evaluation.Evaluator(cfg, graphdef, mesh) if cfg.eval.every_steps else None
  return Trainer(cfg, mesh, graphdef, optimizer, abstract, shardings, train_step, data_iter,
                 metrics_lib.train_flops_per_token(cfg.model, cfg.train.seq_len), metrics_lib.peak_flops(),
                 evaluator)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Process-local numpy rows -> one global jax.Array per key, sharded on the batch axes."""
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local_batch[k]))
          for k in step_lib.BATCH_KEYS}


def make_checkpointer(cfg, workdir: str, keep_steps=()) -> checkpoint_lib.Checkpointer:
  """The run's checkpointer; `keep_steps` are never deleted (a staged recipe's phase boundaries)."""
  k = cfg.checkpoint
  return checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=k.every_steps,
                                     every_minutes=k.every_minutes, keep=k.keep, keep_period=k.keep_period,
                                     async_save=k.async_save, keep_steps=keep_steps)


class Preemption:
  """SIGTERM/SIGINT -> `stop_at(step)` turns True (at the same step on every process).

  One process: a Python handler sets a flag. Several: JAX's coordination service owns SIGTERM and
  its sync point (asked once per step through the checkpointer) names the step; SIGINT is re-raised
  as SIGTERM so it takes the same path. A second SIGINT interrupts at once.
  """

  def __init__(self, ckpt: checkpoint_lib.Checkpointer):
    self._ckpt, self._multi, self.signal = ckpt, jax.process_count() > 1, None
    self._previous = {}

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.signal is not None:
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name
    log.warning("%s received: finishing the current step, saving a checkpoint, then exiting", self.signal)
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)

  def __enter__(self):
    for sig in (signal.SIGINT,) if self._multi else (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def stop_at(self, step: int) -> bool:
    reached = self._ckpt.reached_preemption(step)  # every step, on every process
    return reached or (not self._multi and self.signal is not None)


@jax.jit
def _tally(tally, nonfinite, step):
  """[non-finite steps so far, first such step (0 = none)], updated on device without a host sync."""
  bad = nonfinite > 0
  return jnp.stack([tally[0] + bad, jnp.where((tally[1] == 0) & bad, step, tally[1])]).astype(jnp.int32)


def _check_tally(cfg, tally, step: int) -> int:
  """The non-finite step count; raises under nan_policy "stop" once there is one."""
  count, first = (int(x) for x in np.asarray(tally))
  if count and cfg.train.nan_policy == "stop":
    raise NonFiniteLossError(
        f"step {first}: the loss or gradient norm is NaN/Inf ({count} such step(s) by step {step}; their "
        "updates were skipped). Fix: lower optim.lr or raise optim.warmup_steps, check the data, or set "
        "--config.train.nan_policy=skip to skip such steps and go on")
  return count


def restore(trainer: Trainer, ckpt, with_data: bool = True) -> tuple[state_lib.TrainState, np.ndarray, str]:
  """(state, tally, phase) from the newest good checkpoint, or a fresh state.

  with_data=False leaves `trainer.data_iter` as it is (a staged recipe's next phase starts a new stream).
  """
  abstract = trainer.abstract_state
  restored = ckpt.restore_latest({"params": abstract.params, "opt_state": abstract.opt_state},
                                 trainer.data_iter if with_data else None)
  if restored is None:
    log.info("no checkpoint in %s: starting from step 0", ckpt.directory)
    return trainer.init_state(), np.zeros(2, np.int32), trainer.cfg.checkpoint.phase
  step = jax.make_array_from_callback((), trainer.state_shardings.step, lambda _: np.int32(restored.step))
  log.info("resumed from checkpoint step %d (phase %s) in %s", restored.step, restored.meta["phase"],
           ckpt.directory)
  tally = np.asarray([restored.meta["nonfinite_steps"], restored.meta["first_nonfinite_step"]], np.int32)
  return (state_lib.TrainState(step, restored.items["params"], restored.items["opt_state"]), tally,
          restored.meta["phase"])


def _drop_logged_after(workdir: str, step: int):
  """Keeps metrics.jsonl lines up to `step`: the steps after it are about to be logged again."""
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
  if len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def _save(ckpt, trainer: Trainer, state, tally, step: int, phase: str):
  count, first = (int(x) for x in np.asarray(tally))
  meta = {"phase": phase, "config": json.loads(trainer.cfg.to_json()), "nonfinite_steps": count,
          "first_nonfinite_step": first, "process_count": jax.process_count(), "devices": jax.device_count()}
  ckpt.save(step, {"params": state.params, "opt_state": state.opt_state}, meta=meta, data_iter=trainer.data_iter)


def train(cfg, workdir: str, trainer: Trainer | None = None) -> dict:
  """Runs (or continues) training to `cfg.train.steps`; returns the last logged metrics.

  `trainer`: one already built by `setup(cfg)`, e.g. with its data iterator swapped by a caller.
  A config with `phases` is a staged recipe: `loopjax.phase_runner` walks it, calling `run_steps`.
  """
  if cfg.phases:
    from loopjax.phase_runner import train_recipe
    return train_recipe(cfg, workdir)
  trainer = trainer or setup(cfg)
  ckpt = make_checkpointer(cfg, workdir)
  try:
    with Preemption(ckpt) as preemption:
      state, tally, _ = restore(trainer, ckpt)
      start = int(state.step)
      with Session(cfg, workdir, start, cfg.train.steps) as session:
        return run_steps(trainer, ckpt, preemption, session, state, tally, start, cfg.train.steps)[2]
  finally:
    ckpt.close()  # waits for the save in flight


class Session:
  """What one invocation writes besides checkpoints: metrics.jsonl, TensorBoard and the progress bar.

  Opening it drops the metrics.jsonl lines after `start` (logged by a run that died after them).
  """

  def __init__(self, cfg, workdir: str, start: int, total_steps: int):
    _drop_logged_after(workdir, start)
    is_writer = jax.process_index() == 0
    self.writer = metrics_lib.MetricWriter(workdir, enabled=is_writer)
    self.progress = None
    if is_writer and cfg.train.progress:
      from tqdm import tqdm
      self.progress = tqdm(total=total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.progress is not None:
      self.progress.close()
    self.writer.close()


def run_steps(trainer: Trainer, ckpt, preemption: Preemption, session: Session, state, tally, start: int,
              end: int):
  """Steps start -> end with `trainer`, saving at `end`: (state, tally, last logged metrics, preempted).

  The step at `end` is always logged, evaluated (when eval is on) and saved: for a staged recipe `end`
  is a segment's (a phase boundary or a batch-ramp stage), for a single-phase run train.steps.
  """
  cfg = trainer.cfg
  last, preempted = {}, False
  tally = jnp.asarray(tally)
  writer, progress = session.writer, session.progress
  with jax.set_mesh(trainer.mesh):
    batch = global_batch(next(trainer.data_iter), trainer.mesh) if start < end else None
    compile_start = time.perf_counter()
    compiled_step = trainer.train_step.lower(state, batch).compile() if batch is not None else None
    compile_seconds = time.perf_counter() - compile_start
    log.info("compiled the train step in %.1f s", compile_seconds)
    distributed.barrier("train_step_compiled")  # gloo drops peers > 30 s late to the first collective
    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
    for step in range(start, end):
      if batch is None:
        batch = global_batch(next(trainer.data_iter), trainer.mesh)
      state, step_metrics = compiled_step(state, batch)
      batch = None
      done = step + 1
      tally = _tally(tally, step_metrics["nonfinite"], done)
      window_tokens += cfg.train.batch_size * cfg.train.seq_len
      window_steps += 1
      if progress is not None:
        progress.update(1)
      if done % cfg.train.log_every == 0 or done == end:
        last = metrics_lib.to_python(step_metrics)  # blocks until the step is finished
        elapsed = time.perf_counter() - window_start
        last["tokens_per_sec"] = window_tokens / elapsed
        last["step_time"] = elapsed / window_steps
        last["mfu"] = last["tokens_per_sec"] * trainer.flops_per_token / trainer.peak_flops
        last["compile_seconds"] = compile_seconds
        last["nonfinite_steps"] = _check_tally(cfg, tally, done)
        writer.write(done, last)
        if progress is not None:
          progress.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_sec']:.0f}")
        window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
      if trainer.evaluator and (done % cfg.eval.every_steps == 0 or done == end):
        eval_start = time.perf_counter()
        results = trainer.evaluator(state.params)
        writer.write(done, dict(results, eval_seconds=time.perf_counter() - eval_start))
        window_start += time.perf_counter() - eval_start  # keep eval time out of tokens/s
      preempted = preemption.stop_at(done)
      if preempted or done == end or ckpt.should_save(done):
        _check_tally(cfg, tally, done)
        _save(ckpt, trainer, state, tally, done, cfg.checkpoint.phase)
      if preempted:
        log.warning("preempted: saved step %d; waiting for the write to finish", done)
        ckpt.wait()
        break
  return state, tally, last, preempted
