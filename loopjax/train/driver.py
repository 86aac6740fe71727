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
step with more rows concatenates several, so a batch ramp never restarts the stream (`feed.py`).

Preemption: SIGTERM or SIGINT finishes the step in flight, saves, waits for the save and returns
normally. Phase log: WORKDIR/phases.jsonl and a console line per start / resume / end of a phase.
A long run's care: the hang watchdog (`watchdog.py`), loss-spike skipping (`spikes.py`, whose state a
checkpoint keeps in its metadata), trackers (`trackers.py`) and profiles on demand (`profiling.py`).
"""

import collections
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from loopjax import checkpoint as checkpoint_lib
from loopjax import config_longrun
from loopjax.config import ConfigError
from loopjax import data as data_lib
from loopjax import distributed
from loopjax import lease as lease_lib
from loopjax import metrics as metrics_lib
from loopjax import phases as phases_lib
from loopjax import storage
from loopjax.checkpoint.listing import complete_steps
from loopjax.data.validate import validate_data
from loopjax.model import model_kind
from loopjax.train import hooks as hooks_lib
from loopjax.train import narration
from loopjax.train import resume_schedule
from loopjax.train import spikes
from loopjax.train import state as state_lib
from loopjax.train import trackers as trackers_lib
from loopjax.train.feed import Rows, global_batch
from loopjax.train.init_from import check_init, initial_state
from loopjax.train.preemption import Preemption
from loopjax.train.profiling import ProfileHook
from loopjax.train.result import RunResult
from loopjax.train.trainer import Trainer, build_trainer, make_mesh, resolve_attention
from loopjax.train.transitions import enter_phase
from loopjax.train.watchdog import Watchdog, WatchdogHook
from loopjax.train.writer import MetricWriter

log = logging.getLogger("loopjax")


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
    self.lr_clamp = None  # [step, lr]: the LR never rises above lr (loopjax/train/resume_schedule.py)
    self.lease = None  # WORKDIR's lease while run() holds it (process 0's; loopjax/lease.py)
    self.watchdog = Watchdog(cfg.train.step_timeout, on_expiry=lambda: self.lease and self.lease.release())
    self.times = collections.Counter()  # host seconds outside the step, by activity (MetricsHook's breakdown)
    self._compiled = set()  # step shapes whose compile was announced

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

  def rows(self, seg, stream) -> Rows:
    return Rows(stream, seg.cfg.train.batch_size // seg.unit_rows)

  def restore(self, ckpt):
    """(state, tally, step, the phase's stream) from the newest good checkpoint, or a fresh state.

    A checkpoint's restore target is the model and state layout of the phase that wrote it, and the
    data stream is that phase's (a fallback past a damaged checkpoint may cross a phase boundary).
    `checkpoint.recovery` decides which checkpoint that is and what happens to those that fail.
    """
    chosen = {}

    def target(step):
      ph = self.plan.phase_at(step)
      seg = next(s for s in ph.segments if s.start < step <= s.end) if step else ph.segments[0]
      chosen[step] = stream, trainer = self.stream(ph), self.trainer(seg)
      abstract = trainer.abstract_state
      # The data state is restored even at a phase's last step: a damaged checkpoint there falls back
      # to one inside the phase, whose stream must continue (at the end, the next phase starts anew).
      return {"params": abstract.params, "opt_state": spikes.strip(abstract.opt_state)}, self.rows(seg, stream)

    k = self.cfg.checkpoint
    with self.watchdog.busy("restoring the newest checkpoint"):
      restored = checkpoint_lib.restore_latest(ckpt, target, retries=k.restore_retries,
                                               retry_seconds=k.restore_retry_seconds,
                                               allow_fresh_start=k.allow_fresh_start)
    if restored is None:
      log.info("no checkpoint in %s: starting from step 0", ckpt.directory)
      first = self.plan[0]
      trainer = self.trainer(first.segments[0])
      return initial_state(trainer), np.zeros(2, np.int32), 0, self.stream(first)  # init.from_hf / from_checkpoint
    stream, trainer = chosen[restored.step]
    log.info("resumed from checkpoint step %d (phase %s) in %s", restored.step, restored.meta["phase"],
             ckpt.directory)
    self.adopt_schedule(restored.step, restored.meta)
    step_array = jax.make_array_from_callback((), trainer.state_shardings.step, lambda _: np.int32(restored.step))
    opt_state = spikes.rejoin(trainer.abstract_state.opt_state, restored.items["opt_state"],
                              restored.meta.get("spike_guard"))  # the guard's windows ride in the metadata
    state = state_lib.TrainState(step_array, restored.items["params"], opt_state)
    tally = np.asarray([restored.meta["nonfinite_steps"], restored.meta["first_nonfinite_step"]], np.int32)
    return state, tally, restored.step, stream

  def adopt_schedule(self, step: int, meta: dict):
    """The LR schedule a resume at `step` goes on with: the checkpoint's, or after a change the one
    `optim.on_schedule_change` asks for (or ConfigError); trainers are rebuilt on it before any compile."""
    schedule, self.lr_clamp = resume_schedule.resume(self.cfg, self.plan, step, meta)
    if schedule is not self.plan.schedule:
      self.plan.schedule, self._trainers = schedule, {}

  def save(self, ckpt, info: hooks_lib.StepInfo):
    count, first = (int(x) for x in np.asarray(info.tally))
    cfg = info.trainer.cfg
    meta = {"phase": cfg.checkpoint.phase, "config": json.loads(cfg.to_json()), "nonfinite_steps": count,
            "first_nonfinite_step": first, "process_count": jax.process_count(), "devices": jax.device_count(),
            "lr_schedule": resume_schedule.record(self.cfg, self.plan, self.lr_clamp, info.step,
                                                  info.metrics.get("lr")),
            "spike_guard": spikes.to_meta(info.state.opt_state)}
    ckpt.save(info.step, {"params": info.state.params, "opt_state": spikes.strip(info.state.opt_state)}, meta=meta,
              data_iter=info.data_iter)

  def log_phase(self, ph, event: str, step: int, seconds: float, last: dict | None = None):
    """The phase's line on the console and in WORKDIR/phases.jsonl (process 0).

    `event`: start, resume, end, or preempted (file only: the console already says what was saved).
    A phase's wall time is the sum of its end and preempted lines' `wall_seconds`, one per session.
    """
    if jax.process_index() != 0:
      return
    tokens = sum((min(step, s.end) - s.start) * s.cfg.train.batch_size * s.cfg.train.seq_len
                 for s in ph.segments if s.start < step)
    if event == "end":
      log.info("%s", narration.phase_end(ph, step, seconds, tokens, last or {}))
    elif event != "preempted":
      log.info("%s", narration.phase_start(self.plan, ph, step, jax.device_count()))
    storage.append_line(storage.run_path(self.workdir) / "phases.jsonl", json.dumps(
        {"phase": ph.spec.name, "event": event, "step": step, "start_step": ph.start, "end_step": ph.end,
         "tokens": tokens, "wall_seconds": round(seconds, 3), "time": time.time()}) + "\n")

  def run(self) -> RunResult:
    """Trains to the end (or a preemption) holding WORKDIR's lease, taken before the restore and anything
    compiles and released after the last save, however the run ends: one writer per workdir."""
    self.watchdog.start()
    try:
      with lease_lib.held(self.workdir, self.cfg.checkpoint) as self.lease:
        return self.run_held()
    finally:
      self.watchdog.close()

  def run_held(self) -> RunResult:
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
        trackers = (trackers_lib.Trackers(self.cfg.train, trackers_lib.run_info(self.cfg, self.workdir, self.plan))
                    if jax.process_index() == 0 else None)
        writer = MetricWriter(self.workdir, step, "tensorboard" in config_longrun.trackers(self.cfg.train), trackers)
        hooks = self.default_hooks(ckpt, writer, step)
        step, preempted = self.walk(hooks, preemption, state, tally, step, stream)
    except BaseException as error:
      _close_after_fault(hooks, writer, ckpt, error)
      raise
    _close_after_fault(hooks, writer, ckpt, None)
    steps = ckpt.all_steps()
    return RunResult(self.workdir, step, hooks[0].last if hooks else {}, writer.metrics_path,
                     writer.tensorboard_dir, os.fspath(ckpt.directory / str(steps[-1])) if steps else None, preempted)

  def default_hooks(self, ckpt, writer: MetricWriter, start: int) -> list:
    """Metrics first (the others read or adjust its window), then the lease check, progress, eval, profile,
    checkpoints."""
    t = self.cfg.train
    peak, source = metrics_lib.peak_flops(self.cfg)
    log.info("MFU peak %.4g GFLOP/s (%s)", peak / 1e9, source)
    metrics = hooks_lib.MetricsHook(writer, peak, self.times)
    hooks = [metrics, hooks_lib.LeaseHook(self.lease), WatchdogHook(self.watchdog)]  # lease: stops before a save
    if t.progress and jax.process_index() == 0:
      hooks.append(hooks_lib.ProgressHook(start, self.plan.total_steps, metrics))
    if self.cfg.eval.every_steps:
      hooks.append(hooks_lib.EvalHook(writer, metrics))
    if self.cfg.eval.harness_every_steps:
      hooks.append(hooks_lib.HarnessHook(self.cfg, writer, metrics))
    hooks.append(ProfileHook(self.workdir, t.profile_steps))  # also on demand: WORKDIR/PROFILE, SIGUSR1

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
          with self.watchdog.busy(f"entering phase {ph.spec.name}"):
            state = enter_phase(ph, self.plan[ph.index - 1] if ph.index else None, state, trainer)
        state, tally, preempted = self.run_segment(trainer, self.rows(seg, stream), hooks, preemption, state,
                                                   tally, step, seg.end)
        step = int(state.step)
        if preempted:
          self.log_phase(ph, "preempted", step, time.perf_counter() - began)
          return step, True
      self.log_phase(ph, "end", step, time.perf_counter() - began, hooks[0].last)
    return step, False

  def run_segment(self, trainer: Trainer, rows: Rows, hooks, preemption, state, tally, start: int, end: int):
    """Steps start -> end of one segment: (state, tally, preempted)."""
    tally = jnp.asarray(tally)
    with jax.set_mesh(trainer.mesh):
      batch = global_batch(next(rows), trainer.mesh)
      compile_start = time.perf_counter()
      with self.watchdog.busy("compiling the train step"):
        compiled_step = trainer.train_step.lower(state, batch).compile()
        compile_seconds = time.perf_counter() - compile_start
        distributed.barrier("train_step_compiled")  # gloo drops peers > 30 s late to the first collective
      shape = narration.step_key(trainer.cfg, trainer.objective)  # one line per shape, not per segment
      log.log(logging.DEBUG if shape in self._compiled else logging.INFO, "%s",
              narration.compile_line(trainer.cfg, self.cfg.model.attention, compile_seconds))
      self._compiled.add(shape)
      for hook in hooks:
        hook.start_segment(trainer, start, end, compile_seconds)
      for step in range(start, end):
        if batch is None:
          waited = time.perf_counter()
          batch = global_batch(next(rows), trainer.mesh)
          self.times["data"] += time.perf_counter() - waited
        state, step_metrics = compiled_step(state, batch)
        batch = None
        done = step + 1
        tally = _tally(tally, step_metrics["nonfinite"], done)
        info = hooks_lib.StepInfo(done, state, step_metrics, tally, trainer, rows, end, preemption.stop_at(done))
        for hook in (h for h in hooks if h.due(info)):
          self.call_hook(hook, info)
        if info.preempted:
          return state, tally, True
    return state, tally, False

  def call_hook(self, hook, info):
    """A hook's call; one that may take long (`activity`) runs under the watchdog's allowance, its time counted."""
    if hook.activity is None:
      return hook(info)
    began = time.perf_counter()
    with self.watchdog.busy(f"the {hook.activity} hook at step {info.step}"):
      hook(info)
    self.times[hook.activity] += time.perf_counter() - began


def _close_after_fault(hooks, writer, ckpt, fault: BaseException | None):
  """Closes the hooks, the metric writer and the checkpointer (which waits for the save in flight), each
  even if another fails. A failed checkpoint write is raised above anything else (it names the step the
  run can no longer resume from; a full disk fails the metrics too); otherwise the first error, unless
  the run is already ending with `fault`."""
  errors = []
  for close in [hook.close for hook in hooks] + ([writer.close] if writer else []) + [ckpt.close]:
    try:
      close()
    except Exception as e:  # noqa: BLE001 - collected; the most telling one is raised below
      errors.append(e)
  write_errors = [e for e in errors if isinstance(e, checkpoint_lib.CheckpointWriteError)]
  if write_errors and not isinstance(fault, checkpoint_lib.CheckpointWriteError):
    raise write_errors[0] from fault
  if errors and fault is None:
    raise errors[0]


def train(cfg, workdir: str) -> RunResult:
  """Runs (or continues) the run `cfg` describes in `workdir` to its end; see the module docstring."""
  return Runner(cfg, workdir).run()


def write_start_checkpoint(cfg, workdir: str) -> str:
  """`loopjax import-hf`: saves the step-0 state of `cfg`'s run in `workdir` (which must have no checkpoint)
  and returns its path. The state is the one `train` would start from (`init_from.initial_state`: e.g.
  init.from_hf's weights in the run's dtype and shardings, a fresh optimizer state) and the checkpoint the
  driver's own, so `train` resumes from it and `upscale`/`export-hf` read it like any other. The init
  source is checked before anything is created, so a bad source leaves `workdir` untouched.
  """
  directory = os.path.join(workdir, "checkpoints")
  if complete_steps(directory):
    raise checkpoint_lib.CheckpointError(f"{directory} already holds checkpoints. Fix: give a new --workdir "
                                         "(training there continues from its newest checkpoint, not from the import)")
  check_init(cfg)
  runner = Runner(cfg, workdir)
  with lease_lib.held(workdir, cfg.checkpoint):  # not while a `loopjax train` writes there
    ckpt = make_checkpointer(cfg, workdir)
    try:
      state, tally, _, stream = runner.restore(ckpt)
      segment = runner.plan[0].segments[0]
      trainer = runner.trainer(segment)
      runner.save(ckpt, hooks_lib.StepInfo(0, state, {}, tally, trainer, runner.rows(segment, stream), segment.end,
                                           False))
    finally:
      ckpt.close()
  return os.path.join(directory, "0")
