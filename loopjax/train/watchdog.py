"""The hang watchdog: a run whose train steps stop finishing ends with every thread's stack and exit 76.

Why: a collective that never completes (a host that froze or died, a network partition) or a data
reader stuck on storage fails nothing; every process just waits, and a scheduler never restarts the
job. Levanter's ProgressWatchdog does the same for the same reason.

Progress is a step finishing on the devices: the driver hands over each dispatched step's loss, and a
background thread polls it with `jax.Array.is_ready` (the host never blocks for it). The limit, with
`train.step_timeout` = 0 (auto), is max(AUTO_MIN_SECONDS, AUTO_FACTOR x the median time per step) once
AUTO_SAMPLES steps of the segment have finished; a set step_timeout is the limit as given, and inf
turns the watchdog off. Until those first steps have finished, and while the run does other work
(`busy`: restoring, compiling, evaluating, saving; `pause`: from a segment's end to the next one's
first step), the limit is at least ALLOWANCE_SECONDS.

On expiry: one line naming what it waited for, faulthandler's dump of every Python thread's stack
(stderr, i.e. the log), the workdir's lease released (so the rerun is not refused; at most 10 s), and
`os._exit(76)`: the main thread is stuck, so nothing can be raised in it. The launch scripts run the
command again on 76 as on 75, and the run resumes from its newest checkpoint. With several processes
each has its own watchdog; a hung collective stops them all.
"""

import collections
import contextlib
import faulthandler
import math
import os
import statistics
import sys
import threading
import time

from loopjax.cli.errors import EXIT_HUNG
from loopjax.train.hooks import Hook

AUTO_MIN_SECONDS = 300.0
AUTO_FACTOR = 20.0
AUTO_SAMPLES = 5
ALLOWANCE_SECONDS = 1800.0
RELEASE_SECONDS = 10.0


class Watchdog:
  """Watches that steps keep finishing; `start()` it, report steps with `dispatched`, wrap other work in
  `busy(what)`, `close()` it at the end. `on_expiry()` runs (bounded) before the process exits."""

  def __init__(self, timeout: float, on_expiry=None):
    self.timeout, self.on_expiry = timeout, on_expiry
    self._lock = threading.Lock()
    self._pending = collections.deque()  # (step, marker array) dispatched, not seen finished yet
    self._per_step = collections.deque(maxlen=101)  # seconds per finished step, this segment
    self._finished, self._progress_at = 0, time.monotonic()
    self._activity = "starting the run"  # what the run is doing instead of stepping (None: stepping)
    self._closed = threading.Event()
    self._thread = None

  def start(self) -> "Watchdog":
    if math.isfinite(self.timeout):
      self._thread = threading.Thread(target=self._watch, name="loopjax-watchdog", daemon=True)
      self._thread.start()
    return self

  def close(self):
    self._closed.set()

  def segment_started(self):
    """A segment's steps begin: the auto limit is learnt anew (a phase may step at another speed)."""
    with self._lock:
      self._per_step.clear()
      self._pending.clear()
      self._activity, self._progress_at = None, time.monotonic()

  def pause(self, what: str):
    """Stepping stops until the next `segment_started` (a segment's end: saves, a transition, a compile)."""
    with self._lock:
      self._activity, self._progress_at = what, time.monotonic()

  def dispatched(self, step: int, marker):
    """Step `step` was dispatched; it has finished when `marker` (one of its outputs) is ready."""
    if not math.isfinite(self.timeout):
      return  # off: nothing would ever take the markers (device arrays) off the queue
    with self._lock:
      self._pending.append((step, marker))

  @contextlib.contextmanager
  def busy(self, what: str):
    """Work other than stepping (e.g. "compiling the train step"): the longer allowance applies."""
    with self._lock:
      before, self._activity, self._progress_at = self._activity, what, time.monotonic()
    try:
      yield
    finally:
      with self._lock:
        self._activity, self._progress_at = before, time.monotonic()

  def limit(self) -> float:
    """Seconds the current wait may last (call with the lock held)."""
    allowance = max(self.timeout, ALLOWANCE_SECONDS)
    if self._activity is not None:
      return allowance
    if self.timeout:
      return self.timeout
    if len(self._per_step) < AUTO_SAMPLES:
      return allowance
    return max(AUTO_MIN_SECONDS, AUTO_FACTOR * statistics.median(self._per_step))

  def _poll(self, now: float) -> tuple[float, float]:
    """Takes the finished steps off the queue; (seconds waited, limit)."""
    with self._lock:
      done = 0
      while self._pending and self._pending[0][1].is_ready():
        self._finished = self._pending.popleft()[0]
        done += 1
      if done and self._activity is None:
        self._per_step.append((now - self._progress_at) / done)
      if done:
        self._progress_at = now
      return now - self._progress_at, self.limit()

  def _watch(self):
    poll = min(1.0, self.timeout / 4) if self.timeout else 1.0
    while not self._closed.wait(poll):
      waited, limit = self._poll(time.monotonic())
      if waited > limit and not self._closed.is_set():
        self._expire(waited, limit)

  def _expire(self, waited: float, limit: float):
    what = self._activity or f"step {self._finished + 1} to finish (step {self._finished} was the last)"
    setting = f"{self.timeout:g} s" if self.timeout else f"auto, {limit:.0f} s now"
    sys.stderr.write(
        f"loopjax train: hung: waited {waited:.0f} s for {what} (train.step_timeout: {setting}); every thread's "
        f"stack follows. Exit {EXIT_HUNG}: run the same command again to resume from the newest checkpoint "
        "(raise --config.train.step_timeout if this wait was legitimate)\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    if self.on_expiry is not None:
      releaser = threading.Thread(target=self.on_expiry, daemon=True)
      releaser.start()
      releaser.join(RELEASE_SECONDS)
    sys.stdout.flush()
    os._exit(EXIT_HUNG)


class WatchdogHook(Hook):
  """Hands every dispatched step to the watchdog, which steps from a segment's first step (after every hook's
  own segment set-up) to its last, and learns the step time anew per segment."""

  def __init__(self, watchdog: Watchdog):
    self.watchdog, self._first = watchdog, False

  def due(self, info):
    return True

  def start_segment(self, trainer, start, end, compile_seconds):
    self._first = True

  def __call__(self, info):
    if self._first:
      self.watchdog.segment_started()
      self._first = False
    self.watchdog.dispatched(info.step, info.metrics["loss"])
    if info.last:
      self.watchdog.pause(f"the work after step {info.step}, the end of a segment (saving, building and "
                          "compiling the next)")
