"""The phase runner: one `loopjax train` walks a staged recipe (`loopjax.phases`) to its end.

Per segment of the plan it builds a `Trainer` (the derived config's model, shardings and jitted step)
and hands it to the loop's `run_steps`, which does what a single-phase run does (logging, periodic
and preemption saves, the NaN tally). Between phases it applies the entry transforms, in order:
leave a gate phase, upscale, reset the optimizer, enter a gate phase. A segment whose shapes or
static settings (T, beta, RoPE base, sequence length, batch, layers, objective) differ is a new
jitted step, compiled when its first batch arrives.

Checkpoints: the loop saves at every segment end, so every phase boundary has one, written with the
phase's name and the state as the phase left it (before the next phase's entry transforms), and kept
whatever checkpoint.keep says (e.g. the end of 1a is where Ouro's 2.6B run forks from the 1.4B). After a
restart, the newest checkpoint's step says which phase made it (`Plan.phase_at`): its model and state
layout are the restore target; a step inside a phase restores the data stream too, a phase's last
step starts the next phase afresh.

Data: each phase has one stream (seed = train.seed + phase index) of batches of `unit_rows` rows; a
step with more rows concatenates several. So a batch ramp never restarts the stream, and a restart
anywhere in the phase resumes it exactly (the checkpoint holds the stream's grain state).

Phase log: WORKDIR/phases.jsonl, one line per event: start / resume / end of a phase, with the step,
the phase's tokens so far and the wall time spent in it by this process.
"""

import json
import os
import time

import jax
import numpy as np

from loopjax import checkpoint as checkpoint_lib
from loopjax import config as config_lib
from loopjax import data as data_lib
from loopjax import evaluation
from loopjax import metrics as metrics_lib
from loopjax import phases as phases_lib
from loopjax import sharding, upscale
from loopjax.train import gate_step as gate_lib
from loopjax.train import loop as loop_lib
from loopjax.train import state as state_lib
from loopjax.train import step as step_lib
from loopjax.train.optim import make_optimizer


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
  """The step, also reporting the settings it ran with (checked against the recipe by the tests)."""
  stack_key = upscale.STACK_KEYS[cfg.model.kind]

  def step(state, batch):
    new_state, metrics = step_fn(state, batch)
    facts = {"loop_steps": metrics["ce_per_step"].shape[0], "seq_len": batch["inputs"].shape[1],
             "batch_tokens": batch["inputs"].size, "beta": cfg.objective.beta, "rope_base": cfg.model.rope_base,
             "num_layers": jax.tree.leaves(state.params[stack_key])[0].shape[0]}
    return new_state, dict(metrics, **facts)
  return step


class Runner:
  """One recipe run: the plan, the mesh, and the one optimizer and LR schedule all phases share."""

  def __init__(self, cfg, workdir: str):
    self.cfg, self.workdir = cfg, workdir
    self.mesh = sharding.make_mesh(config_lib.validate(cfg, jax.device_count()))
    self.plan = phases_lib.plan(cfg, jax.device_count())
    self.schedule = phases_lib.schedule(self.plan)
    self.optimizer = make_optimizer(cfg.optim, self.plan.total_steps, self.schedule)
    self.peak_flops = metrics_lib.peak_flops()

  def stream(self, ph):
    return data_lib.make_train_iterator(
        ph.segments[0].cfg.data, seq_len=ph.segments[0].cfg.train.seq_len, global_batch=ph.segments[0].unit_rows,
        seed=self.cfg.train.seed + ph.index, process_index=jax.process_index(), process_count=jax.process_count())

  def trainer(self, seg, stream) -> loop_lib.Trainer:
    cfg, optimizer = seg.cfg, self.optimizer
    graphdef, _ = state_lib.model_graph(cfg.model)
    shardings = state_lib.state_shardings(cfg.model, optimizer, self.mesh)
    init = state_lib.init_fn(cfg.model, optimizer)
    if self.plan[seg.phase_index].spec.objective == "gate":
      abstract_params = jax.eval_shape(init, jax.random.key(0)).params
      shardings = gate_lib.gate_state_shardings(shardings, optimizer, abstract_params, self.mesh)
      step = gate_lib.make_gate_step(cfg, graphdef, optimizer, self.schedule)
      init_layout = lambda key: gate_lib.enter_gate_phase(init(key), optimizer)
    else:
      step = step_lib.make_train_step(cfg, graphdef, optimizer, self.schedule)
      init_layout = init
    abstract = checkpoint_lib.abstract_like(jax.eval_shape(init_layout, jax.random.key(0)), shardings)
    jitted = step_lib.jit_train_step(_with_facts(step, cfg), shardings, self.mesh)
    evaluator = evaluation.Evaluator(cfg, graphdef, self.mesh) if cfg.eval.every_steps else None
    return loop_lib.Trainer(cfg, self.mesh, graphdef, optimizer, abstract, shardings, jitted,
                            _Rows(stream, cfg.train.batch_size // seg.unit_rows),
                            metrics_lib.train_flops_per_token(cfg.model, cfg.train.seq_len), self.peak_flops,
                            evaluator)

  def enter(self, ph, state, trainer):
    """The entry transforms of phase `ph` on the state the previous phase left."""
    spec = ph.spec
    previous_gate = ph.index > 0 and self.plan[ph.index - 1].spec.objective == "gate"
    if spec.objective == "gate" and previous_gate and spec.optimizer_on_entry == "keep":
      return state
    if previous_gate:
      state = gate_lib.leave_gate_phase(state)
    lm_shardings = state_lib.state_shardings(trainer.cfg.model, self.optimizer, self.mesh)
    if spec.upscale.layers:
      index = upscale.layer_index(ph.layers_before, spec.upscale.layers, spec.upscale.mapping)
      state = upscale.upscale_state(state, index, stack_key=upscale.STACK_KEYS[trainer.cfg.model.kind],
                                    moments=spec.upscale.moments, optimizer=self.optimizer, shardings=lm_shardings)
    if spec.optimizer_on_entry == "reset" and spec.objective == "lm":
      state = jax.jit(lambda s: state_lib.TrainState(s.step, s.params, self.optimizer.init(s.params)),
                      out_shardings=lm_shardings)(state)
    if spec.objective == "gate":
      state = jax.jit(lambda s: gate_lib.enter_gate_phase(s, self.optimizer),
                      out_shardings=trainer.state_shardings)(state)
    return state

  def log_phase(self, ph, event: str, step: int, seconds: float):
    if jax.process_index() != 0:
      return
    tokens = sum((min(step, s.end) - s.start) * s.cfg.train.batch_size * s.cfg.train.seq_len
                 for s in ph.segments if s.start < step)
    with open(os.path.join(self.workdir, "phases.jsonl"), "a") as f:
      f.write(json.dumps({"phase": ph.spec.name, "event": event, "step": step, "start_step": ph.start,
                          "end_step": ph.end, "tokens": tokens, "wall_seconds": round(seconds, 3),
                          "time": time.time()}) + "\n")

  def restore(self, ckpt):
    """(state, tally, step, the phase's stream) from the newest good checkpoint, or a fresh state.

    The restore target is the model and state layout of the phase that wrote the newest checkpoint.
    If that one is damaged, the checkpointer sets it aside and falls back to the previous one; when
    that lies in a phase with other shapes, it refuses, and the target is recomputed for it.
    """
    while True:
      steps = ckpt.all_steps()
      step = steps[-1] if steps else 0
      ph = self.plan.phase_at(step)
      seg = next(s for s in ph.segments if s.start < step <= s.end) if step else ph.segments[0]
      stream = self.stream(ph)
      try:
        state, tally, _ = loop_lib.restore(self.trainer(seg, stream), ckpt, with_data=0 < step < ph.end)
        return state, tally, int(state.step), stream
      except checkpoint_lib.IncompatibleCheckpointError:
        if ckpt.all_steps() == steps:  # not a fallback: the checkpoints do not fit this recipe
          raise

  def run(self) -> dict:
    ckpt = loop_lib.make_checkpointer(self.cfg, self.workdir, keep_steps=[ph.end for ph in self.plan])
    try:
      with loop_lib.Preemption(ckpt) as preemption:
        state, tally, step, stream = self.restore(ckpt)
        with loop_lib.Session(self.cfg, self.workdir, step, self.plan.total_steps) as session:
          return self.walk(ckpt, preemption, session, state, tally, step, stream)
    finally:
      ckpt.close()

  def walk(self, ckpt, preemption, session, state, tally, step: int, stream) -> dict:
    """Runs the phases from `step` on; returns the last logged metrics."""
    last = {}
    for ph in self.plan:
      if ph.end <= step:
        continue
      began = time.perf_counter()
      stream = stream if ph.start < step else self.stream(ph)
      self.log_phase(ph, "resume" if ph.start < step else "start", step, 0.0)
      for seg in ph.segments:
        if seg.end <= step:
          continue
        trainer = self.trainer(seg, stream)
        if step == ph.start:
          state = self.enter(ph, state, trainer)
        state, tally, last, preempted = loop_lib.run_steps(trainer, ckpt, preemption, session, state, tally,
                                                            step, seg.end)
        step = int(state.step)
        if preempted:
          return last
      self.log_phase(ph, "end", step, time.perf_counter() - began)
    return last


def train_recipe(cfg, workdir: str) -> dict:
  """Runs (or continues) the staged recipe in `cfg.phases`; returns the last logged metrics."""
  return Runner(cfg, workdir).run()
