"""The training driver: `train(cfg, workdir)` walks the run's plan to its end, resuming where it stopped.

    config -> plan (phases -> segments) -> Trainer per segment -> jitted step -> hooks -> checkpoints

A config without phases is a one-segment plan, so a plain run and a staged recipe take one path. Per
segment it builds the `Trainer` (the derived config's model, shardings and jitted step), compiles the
step on the segment's first batch and runs it, calling the hooks (`loopjax.train.hooks`) after every
step. Between phases it applies the entry transforms (`loopjax.train.transitions`).

Checkpoints: every segment end is saved, so every phase boundary has one, with the phase's name and the
state as the phase left it, kept whatever checkpoint.keep says. After a restart, the newest checkpoint's
step says which phase made it (`Plan.phase_at`): its model and state layout are the restore target; a
step inside a phase restores the data stream too, a phase's last step starts the next phase afresh.
On CPU the continuation is bitwise the uninterrupted run.

Data: each phase has one stream (seed = train.seed + phase index) of batches of `unit_rows` rows; a
step with more rows concatenates several, so a batch ramp never restarts the stream.

Preemption: SIGTERM or SIGINT finishes the step in flight, saves, waits for the save and returns
normally. Phase log: WORKDIR/phases.jsonl, one line per start / resume / end of a phase.
"""

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from loopjax import checkpoint as checkpoint_lib
from loopjax.config import ConfigError
from loopjax import data as data_lib
from loopjax import distributed
from loopjax import metrics as metrics_lib
from loopjax import phases as phases_lib
from loopjax import sharding
from loopjax import storage
from loopjax.data.validate import validate_data
from loopjax.model import model_kind
from loopjax.train import hooks as hooks_lib
from loopjax.train import state as state_lib
from loopjax.train import step as step_lib
from loopjax.train.init_from import initial_state
from loopjax.train.preemption import Preemption
from loopjax.train.result import RunResult
from loopjax.train.trainer import Trainer, build_trainer, make_mesh, resolve_attention
from loopjax.train.transitions import enter_phase
from loopjax.train.writer import MetricWriter

log = logging.getLogger("loopjax")


def global_batch(local_batch: dict, mesh) -> dict:
  """Process-local numpy rows -> one global jax.Array per key, sharded on the batch axes."""
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local_batch[k]))
          for k in step_lib.BATCH_KEYS}


class _Rows:
  """`take` batches of the phase's stream per step, concatenated; its state is the stream's."""

  def __init__(self, stream, take: int):
    self.stream, self.take = stream, take

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    parts = [next(self.stream) for _ in range(self.take)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    return self.stream.get_state()

  def set_state(self, state: dict):
    self.stream.set_state(state)


def _with_facts(step_fn, cfg):
  """The step, also reporting the settings it ran with (the recipe tests check them per step)."""
  stack_key = model_kind(cfg.model.kind).stack_key

  def step(state, batch):
    new_state, metrics = step_fn(state, batch)
    facts = {"loop_steps": metrics["ce_per_step"].shape[0], "seq_len": batch["inputs"].shape[1],
             "batch_tokens": batch["inputs"].size, "beta": cfg.objective.beta, "rope_base": cfg.model.rope_base,
             "num_layers": jax.tree.leaves(state.params[stack_key])[0].shape[0]}
    return new_state, dict(metrics, **facts)
  return step


@jax.jit
def _tally(tally, nonfinite, step):
  """[non-finite steps so far, first such step (0 = none)], updated on device without a host sync."""
  bad = nonfinite > 0
  return jnp.stack([tally[0] + bad, jnp.where((tally[1] == 0) & bad, step, tally[1])]).astype(jnp.int32)


def make_checkpointer(cfg, workdir: str, keep_steps=()) -> checkpoint_lib.Checkpointer:
  """The run's checkpointer; `keep_steps` are never deleted (a staged recipe's phase boundaries)."""
  k = cfg.checkpoint
  return checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=k.every_steps,
                                     every_minutes=k.every_minutes, keep=k.keep, keep_period=k.keep_period,
                                     async_save=k.async_save, keep_steps=keep_steps, compress=k.compress)


def check_run(cfg, num_devices: int) -> phases_lib.Plan:
  """Every start-up check of a run, before anything is built: the config, each phase, each phase's data
  (corpus manifests, mixture weights, vocabulary) and its attention implementation on these devices.
  Returns the plan; raises ConfigError naming the field."""
  plan = phases_lib.plan(cfg, num_devices)
  for seg in (s for ph in plan for s in ph.segments):
    try:
      validate_data(seg.cfg)
      resolve_attention(seg.cfg, jax.devices()[0].platform)
    except ConfigError as e:
      raise ConfigError(f"config.phases[{seg.phase_index}] ({seg.cfg.checkpoint.phase!r}): in this phase {e}"
                        if cfg.phases else str(e)) from None
  return plan


class Runner:
  """One run: its plan, mesh and workdir; `run()` trains to the end (or to a preemption)."""

  def __init__(self, cfg, workdir: str):
    self.cfg, self.workdir = cfg, workdir
    storage.check_run_dir(workdir)
    self.plan = check_run(cfg, jax.device_count())
    self._meshes, self._trainers = {}, {}

  def stream(self, ph):
    first = ph.segments[0]
    return data_lib.make_train_iterator(
        first.cfg.data, seq_len=first.cfg.train.seq_len, global_batch=first.unit_rows,
        seed=self.cfg.train.seed + ph.index, process_index=jax.process_index(), process_count=jax.process_count())

  def mesh(self, seg):
    """The segment's mesh (a recipe's phases may each have their own), one Mesh object per shape."""
    key = tuple(seg.cfg.mesh[axis] for axis in phases_lib.MESH_AXES)
    if key not in self._meshes:
      self._meshes[key] = make_mesh(seg.cfg)
    return self._meshes[key]

  def trainer(self, seg) -> Trainer:
    key = (seg.start, seg.end)
    if key not in self._trainers:
      objective = self.plan[seg.phase_index].spec.objective
      self._trainers[key] = build_trainer(seg.cfg, self.mesh(seg), self.plan.schedule, objective, _with_facts)
    return self._trainers[key]

  def rows(self, seg, stream) -> _Rows:
    return _Rows(stream, seg.cfg.train.batch_size // seg.unit_rows)

  def restore(self, ckpt):
    """(state, tally, step, the phase's stream) from the newest good checkpoint, or a fresh state.

    The restore target is the model and state layout of the phase that wrote the newest checkpoint,
    and the data stream is that phase's.
    If that one is damaged, the checkpointer sets it aside and falls back to the previous one; when
    that lies in a phase with other shapes, it refuses, and the target is recomputed for it.
    """
    while True:
      steps = ckpt.all_steps()
      step = steps[-1] if steps else 0
      ph = self.plan.phase_at(step)
      seg = next(s for s in ph.segments if s.start < step <= s.end) if step else ph.segments[0]
      stream, trainer = self.stream(ph), self.trainer(seg)
      abstract = trainer.abstract_state
      try:
        # The data state is restored even at a phase's last step: a damaged checkpoint there falls back
        # to one inside the phase, whose stream must continue (at the end, the next phase starts anew).
        restored = ckpt.restore_latest({"params": abstract.params, "opt_state": abstract.opt_state},
                                       self.rows(seg, stream))
      except checkpoint_lib.IncompatibleCheckpointError:
        if ckpt.all_steps() == steps:  # not a fallback: the checkpoints do not fit this recipe
          raise
        continue
      if restored is None:
        log.info("no checkpoint in %s: starting from step 0", ckpt.directory)
        return initial_state(trainer), np.zeros(2, np.int32), 0, stream  # init.from_hf / from_checkpoint
      log.info("resumed from checkpoint step %d (phase %s) in %s", restored.step, restored.meta["phase"],
               ckpt.directory)
      step_array = jax.make_array_from_callback((), trainer.state_shardings.step,
                                                lambda _: np.int32(restored.step))
      state = state_lib.TrainState(step_array, restored.items["params"], restored.items["opt_state"])
      tally = np.asarray([restored.meta["nonfinite_steps"], restored.meta["first_nonfinite_step"]], np.int32)
      return state, tally, restored.step, stream

  def save(self, ckpt, info: hooks_lib.StepInfo):
    count, first = (int(x) for x in np.asarray(info.tally))
    cfg = info.trainer.cfg
    meta = {"phase": cfg.checkpoint.phase, "config": json.loads(cfg.to_json()), "nonfinite_steps": count,
            "first_nonfinite_step": first, "process_count": jax.process_count(), "devices": jax.device_count()}
    ckpt.save(info.step, {"params": info.state.params, "opt_state": info.state.opt_state}, meta=meta,
              data_iter=info.data_iter)

  def log_phase(self, ph, event: str, step: int, seconds: float):
    if jax.process_index() != 0:
      return
    tokens = sum((min(step, s.end) - s.start) * s.cfg.train.batch_size * s.cfg.train.seq_len
                 for s in ph.segments if s.start < step)
    storage.append_line(storage.run_path(self.workdir) / "phases.jsonl", json.dumps(
        {"phase": ph.spec.name, "event": event, "step": step, "start_step": ph.start, "end_step": ph.end,
         "tokens": tokens, "wall_seconds": round(seconds, 3), "time": time.time()}) + "\n")

  def run(self) -> RunResult:
    for note in self.plan.notes:
      log.warning("%s", note)
    m = self.cfg.model
    log.info("%s model, %s params, L=%d x T=%d; mesh data=%d fsdp=%d context=%d tensor=%d over %d %s device(s); "
             "%d steps",
             m.kind, f"{state_lib.count_params(m):,}", m.num_layers, m.loop_steps,
             *self.mesh(self.plan[0].segments[0]).devices.shape, jax.device_count(), jax.devices()[0].platform,
             self.plan.total_steps)
    keep = [ph.end for ph in self.plan] if len(self.plan) > 1 else []
    ckpt = make_checkpointer(self.cfg, self.workdir, keep_steps=keep)
    hooks, writer = [], None
    try:
      with Preemption(ckpt) as preemption:
        state, tally, step, stream = self.restore(ckpt)
        writer = MetricWriter(self.workdir, step)
        hooks = self.default_hooks(ckpt, writer, step)
        step, preempted = self.walk(hooks, preemption, state, tally, step, stream)
    finally:
      for hook in hooks:
        hook.close()
      if writer is not None:
        writer.close()
      ckpt.close()  # waits for the save in flight
    steps = ckpt.all_steps()
    return RunResult(self.workdir, step, hooks[0].last if hooks else {}, writer.metrics_path,
                     writer.tensorboard_dir, os.fspath(ckpt.directory / str(steps[-1])) if steps else None, preempted)

  def default_hooks(self, ckpt, writer: MetricWriter, start: int) -> list:
    """Metrics first (the others read or adjust its window), then progress, eval, profile, checkpoints."""
    t = self.cfg.train
    peak, source = metrics_lib.peak_flops(self.cfg)
    log.info("MFU peak %.4g GFLOP/s (%s)", peak / 1e9, source)
    metrics = hooks_lib.MetricsHook(writer, peak)
    hooks = [metrics]
    if t.progress and jax.process_index() == 0:
      hooks.append(hooks_lib.ProgressHook(start, self.plan.total_steps, metrics))
    if self.cfg.eval.every_steps:
      hooks.append(hooks_lib.EvalHook(writer, metrics))
    if t.profile_steps:
      hooks.append(hooks_lib.ProfileHook(self.workdir, t.profile_start, t.profile_steps))

    def save(info):
      writer.sync()  # on a bucket, the metrics a checkpoint covers are uploaded before it
      self.save(ckpt, info)
    hooks.append(hooks_lib.CheckpointHook(ckpt, save))
    return hooks

  def walk(self, hooks, preemption, state, tally, step: int, stream) -> tuple[int, bool]:
    """Runs the phases from `step` on: (the step it ended at, whether a preemption stopped it)."""
    for ph in self.plan:
      if ph.end <= step:
        continue
      began = time.perf_counter()
      stream = stream if ph.start < step else self.stream(ph)
      self.log_phase(ph, "resume" if ph.start < step else "start", step, 0.0)
      for seg in ph.segments:
        if seg.end <= step:
          continue
        trainer = self.trainer(seg)
        if step == ph.start:
          state = enter_phase(ph, self.plan[ph.index - 1] if ph.index else None, state, trainer)
        state, tally, preempted = self.run_segment(trainer, self.rows(seg, stream), hooks, preemption, state,
                                                   tally, step, seg.end)
        step = int(state.step)
        if preempted:
          return step, True
      self.log_phase(ph, "end", step, time.perf_counter() - began)
    return step, False

  def run_segment(self, trainer: Trainer, rows: _Rows, hooks, preemption, state, tally, start: int, end: int):
    """Steps start -> end of one segment: (state, tally, preempted)."""
    tally = jnp.asarray(tally)
    with jax.set_mesh(trainer.mesh):
      batch = global_batch(next(rows), trainer.mesh)
      compile_start = time.perf_counter()
      compiled_step = trainer.train_step.lower(state, batch).compile()
      compile_seconds = time.perf_counter() - compile_start
      log.info("compiled the train step in %.1f s", compile_seconds)
      distributed.barrier("train_step_compiled")  # gloo drops peers > 30 s late to the first collective
      for hook in hooks:
        hook.start_segment(trainer, start, end, compile_seconds)
      for step in range(start, end):
        if batch is None:
          batch = global_batch(next(rows), trainer.mesh)
        state, step_metrics = compiled_step(state, batch)
        batch = None
        done = step + 1
        tally = _tally(tally, step_metrics["nonfinite"], done)
        info = hooks_lib.StepInfo(done, state, step_metrics, tally, trainer, rows, end, preemption.stop_at(done))
        for hook in hooks:
          if hook.due(info):
            hook(info)
        if info.preempted:
          return state, tally, True
    return state, tally, False


def train(cfg, workdir: str) -> RunResult:
  """Runs (or continues) the run `cfg` describes in `workdir` to its end; see the module docstring."""
  return Runner(cfg, workdir).run()
