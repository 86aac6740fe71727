"""What the driver does around the steps, as hooks: metrics, progress, evaluation, checkpoints (profiles:
`profiling.py`, the hang watchdog: `watchdog.py`).

The driver runs the jitted step and, after each, calls every hook whose `due(info)` is true (each has
an `every` period; the last step of a segment and a preempted step are always due). A hook gets a
`StepInfo` whose state and metrics are device arrays still being computed: a hook that reads them
waits for the step. The metrics hook therefore reads a logged step's metrics one step late, after the
next step has been dispatched, so the host never stalls the device at a log step (as nanodo does).

A new hook subclasses `Hook` and is added to the list `driver.default_hooks` builds.
"""

import collections
import dataclasses
import logging
import time

import jax
import numpy as np

from loopjax import lease as lease_lib
from loopjax import metrics as metrics_lib
from loopjax.evaluation.teacher_forced import Evaluator
from loopjax.train import spikes
from loopjax.train.writer import MetricWriter

log = logging.getLogger("loopjax")


class NonFiniteLossError(RuntimeError):
  """train.nan_policy == "stop" and a step had a NaN/Inf loss or gradient norm."""
  exit_code = 3  # a fault during the run (loopjax/cli/errors.py)


@dataclasses.dataclass(frozen=True)
class StepInfo:
  step: int  # optimizer steps done, counting this one
  state: object  # TrainState after the step (device arrays)
  metrics: dict  # the step's metrics (device arrays)
  tally: jax.Array  # int32 [non-finite steps so far, first such step (0 = none)]
  trainer: object  # the segment's Trainer (its cfg is the derived single-phase config)
  data_iter: object  # the segment's batch iterator (its state goes into checkpoints)
  segment_end: int
  preempted: bool

  @property
  def last(self) -> bool:
    """The segment's last step, or the step a preemption stops at."""
    return self.step == self.segment_end or self.preempted


def check_tally(cfg, tally, step: int) -> int:
  """The non-finite step count; raises NonFiniteLossError under nan_policy "stop" once there is one."""
  count, first = (int(x) for x in np.asarray(tally))
  if count and cfg.train.nan_policy == "stop":
    raise NonFiniteLossError(
        f"step {first}: the loss or gradient norm is NaN/Inf ({count} such step(s) by step {step}; their "
        "updates were skipped). Fix: lower optim.lr or raise optim.warmup_steps, check the data, or set "
        "--config.train.nan_policy=skip to skip such steps and go on")
  return count


class Hook:
  every = 1
  # What the hook does when it may take long ("eval", "checkpoint"): the watchdog allows it more time
  # (loopjax/train/watchdog.py) and the metrics rows show its seconds per step as time_<activity>.
  activity = None

  def due(self, info: StepInfo) -> bool:
    return info.step % self.every == 0 or info.last

  def start_segment(self, trainer, start: int, end: int, compile_seconds: float):
    """Called once the segment's step is compiled, before its first step."""

  def __call__(self, info: StepInfo):
    raise NotImplementedError

  def close(self):
    """Called once when the run ends (normally or not)."""


class MetricsHook(Hook):
  """Logs every `train.log_every` steps (and at segment ends) to metrics.jsonl and TensorBoard.

  A logged step's metrics are fetched at the next step's call, after that step is dispatched. The
  fetch returns when the logged step is done, so throughput is measured between such completions
  (the first window from the segment's start, after its compile), minus the time other hooks report
  through `exclude` (evaluation).
  """

  def __init__(self, writer: MetricWriter, peak_flops: float, times: collections.Counter | None = None):
    self.writer, self.peak_flops = writer, peak_flops
    self.times = collections.Counter() if times is None else times  # seconds by activity (the driver adds "data")
    self.last: dict = {}  # the newest logged metrics (Python values)
    self._pending = None
    self._mark, self._tokens, self._steps, self._excluded = 0.0, 0, 0, 0.0

  def start_segment(self, trainer, start, end, compile_seconds):
    self.every, self._trainer, self._compile_seconds = trainer.cfg.train.log_every, trainer, compile_seconds
    self._first_row = True
    self._mark, self._tokens, self._steps, self._excluded = time.perf_counter(), 0, 0, 0.0

  def due(self, info):
    return True  # counts every step's tokens; logs every `self.every` steps and at the last

  def exclude(self, seconds: float):
    self._excluded += seconds

  def __call__(self, info):
    self._flush()  # the previous logged step's metrics: that step is done or nearly so
    self._tokens += info.trainer.cfg.train.batch_size * info.trainer.cfg.train.seq_len
    self._steps += 1
    if info.step % self.every == 0 or info.last:
      self._pending, self._tokens, self._steps = (info, self._tokens, self._steps), 0, 0
    if info.last:
      self._flush()

  def _flush(self):
    if self._pending is None:
      return
    info, tokens, steps = self._pending
    self._pending = None
    last = metrics_lib.to_python(info.metrics)  # waits for the logged step
    now = time.perf_counter()
    elapsed = now - self._mark - self._excluded
    self._mark, self._excluded = now, 0.0
    last["tokens_per_sec"], last["step_time"] = tokens / elapsed, elapsed / steps
    last["mfu"] = last["tokens_per_sec"] * self._trainer.flops_per_token / self.peak_flops
    last["compile_seconds"] = self._compile_seconds
    if self._first_row:  # the segment's resolved attention core (model.attention may say "auto")
      last["attention"], self._first_row = self._trainer.cfg.model.attention, False
    last["nonfinite_steps"] = check_tally(info.trainer.cfg, info.tally, info.step)
    spikes.check(info.trainer.cfg, last, info.step)
    last.update(time_breakdown(self.times, elapsed, steps))
    self.writer.write(info.step, last)
    self.last = dict(last, step=info.step)

  def close(self):
    self._flush()


def time_breakdown(times: collections.Counter, elapsed: float, steps: int) -> dict:
  """Where a logged window's wall time went, in seconds per step (the goodput view): waiting for data,
  saving checkpoints, evaluating (outside step_time), and the rest of step_time, the step itself. Takes the
  window's times out of `times`."""
  spent = {what: times.pop(what, 0.0) / steps for what in ("data", "checkpoint", "eval")}
  row = {f"time_{what}": seconds for what, seconds in spent.items()}
  row["time_step"] = max(elapsed / steps - spent["data"] - spent["checkpoint"], 0.0)
  return row


class ProgressHook(Hook):
  """A tqdm bar over the whole run on process 0, with the newest logged loss and tokens/s."""

  def __init__(self, start: int, total: int, metrics: MetricsHook):
    from tqdm import tqdm
    self.metrics, self._shown = metrics, None
    self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

  def __call__(self, info):
    self.bar.update(1)
    last = self.metrics.last
    if last and last["step"] != self._shown:
      self._shown = last["step"]
      self.bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_sec']:.0f}")

  def close(self):
    self.bar.close()


class EvalHook(Hook):
  """Held-out evaluation every `eval.every_steps` steps and at segment ends, at every `eval.loop_steps`."""
  seconds_key = "eval_seconds"
  activity = "eval"

  def __init__(self, writer: MetricWriter, metrics: MetricsHook):
    self.writer, self.metrics, self.evaluator = writer, metrics, None

  def due(self, info):
    return info.step % self.every == 0 or info.step == info.segment_end

  def start_segment(self, trainer, start, end, compile_seconds):
    self.every = trainer.cfg.eval.every_steps
    self.evaluator = Evaluator(trainer.cfg, trainer.mesh)

  def __call__(self, info):
    began = time.perf_counter()
    results = self.evaluator(info.state.params)
    seconds = time.perf_counter() - began
    self.writer.write(info.step, {**results, self.seconds_key: seconds})
    self.metrics.exclude(seconds)  # keep evaluation out of tokens/s


class HarnessHook(EvalHook):
  """lm-evaluation-harness tasks every `eval.harness_every_steps` steps and at segment ends, at every
  `eval.loop_steps` and at Q-exit `eval.q_exit`, on the live parameters (`evaluation/harness/sweep.py`).
  Made before anything compiles, so an unknown task, missing data or tokenizer stops the run at start-up."""
  seconds_key = "harness_seconds"

  def __init__(self, cfg, writer: MetricWriter, metrics: MetricsHook):
    from loopjax.evaluation.harness import sweep
    super().__init__(writer, metrics)
    self.tasks = sweep.training_tasks(cfg)

  def start_segment(self, trainer, start, end, compile_seconds):
    from loopjax.evaluation.harness import sweep
    self.every = trainer.cfg.eval.harness_every_steps
    self.evaluator = sweep.training_sweep(trainer.cfg, trainer.mesh, self.tasks)


class LeaseHook(Hook):
  """Stops the run once another run took over the workdir's lease (loopjax/lease.py), before the
  checkpoint hook saves. One process: at the next step. Several: at a step all of them stop at (a
  segment end, or the preemption stop process 0 asks for on losing the lease)."""

  def __init__(self, lease):
    self.lease = lease

  def due(self, info):
    return jax.process_count() == 1 or info.last

  def __call__(self, info):
    lease_lib.check(self.lease, info.step)


class CheckpointHook(Hook):
  """Saves at segment ends, on preemption, and when the checkpointer's every-N-steps/minutes policy says."""

  activity = "checkpoint"

  def __init__(self, ckpt, save):
    self.ckpt, self.save = ckpt, save  # save(info): starts writing the checkpoint of info.state

  def due(self, info):
    return info.last or self.ckpt.should_save(info.step)

  def __call__(self, info):
    check_tally(info.trainer.cfg, info.tally, info.step)  # a "stop" run never saves past a bad step
    spikes.check(info.trainer.cfg, info.metrics, info.step)  # nor one past too many spikes in a row
    self.save(info)
    if info.preempted:
      log.warning("preempted: saved step %d; waiting for the write to finish", info.step)
      self.ckpt.wait()
