"""Profiles of a running run: `train.profile_steps`, or on demand with a file or a signal.

Why on demand: a run of weeks slows down at some point nobody planned a profile for. Either
    touch WORKDIR/PROFILE          (or `echo 20 > WORKDIR/PROFILE`: that many steps; a gs:// workdir too)
    kill -USR1 <pid of loopjax>    (that process)
traces the next DEFAULT_STEPS steps (the file is read after the first step, then every CHECK_SECONDS,
by process 0, and removed once seen). `--config.train.profile_steps=100:105` traces steps 101-105 of a run, as planned.

A trace is `jax.profiler`'s: WORKDIR/profile/plugins/profile/<time>/<host>.xplane.pb, for TensorBoard's
profile tab (`tensorboard --logdir WORKDIR`) or Perfetto. On a bucket it is written locally, then copied.
"""

import logging
import math
import os
import signal
import tempfile
import threading
import time

import jax

from loopjax import config_longrun
from loopjax import storage
from loopjax.train.hooks import Hook

log = logging.getLogger("loopjax")

REQUEST_FILE = "PROFILE"
DEFAULT_STEPS = 5
CHECK_SECONDS = 10.0


class ProfileHook(Hook):
  """Starts a trace after a step that asks for one and stops it `steps` steps later (or at the segment end)."""

  def __init__(self, workdir: str, profile_steps: str):
    self.target = storage.run_path(workdir) / "profile"
    self.request = storage.run_path(workdir) / REQUEST_FILE
    self.window = config_longrun.profile_window(profile_steps)
    self.until, self.directory, self._signalled = None, None, False
    self._checked_at = -math.inf  # the first step looks too: a file left before a (re)start is honoured
    self._installed = threading.current_thread() is threading.main_thread()
    if self._installed:
      self._previous_handler = signal.signal(signal.SIGUSR1, self._on_signal)

  def _on_signal(self, signum, frame):
    self._signalled = True

  def due(self, info):
    return True

  def __call__(self, info):
    if self.until is not None:
      if info.step >= self.until or info.last:
        jax.block_until_ready(info.state)
        self._stop(info.step)
      return
    steps = self._requested(info.step)
    if steps and not info.last:
      self.directory = os.fspath(self.target) if not storage.is_remote(self.target) else tempfile.mkdtemp()
      jax.profiler.start_trace(self.directory)
      self.first, self.until = info.step + 1, info.step + steps
      log.info("profiling steps %d-%d", self.first, self.until)

  def _requested(self, step: int) -> int:
    """Steps to trace from the next one on (0: none asked for)."""
    if self.window and step == self.window[0]:
      return self.window[1] - self.window[0]
    if self._signalled:
      self._signalled = False
      return DEFAULT_STEPS
    if jax.process_index() or time.monotonic() - self._checked_at < CHECK_SECONDS:
      return 0
    self._checked_at = time.monotonic()
    if not self.request.exists():
      return 0
    text = self.request.read_text().strip()
    self.request.unlink()
    return int(text) if text.isdigit() and int(text) > 0 else DEFAULT_STEPS

  def _stop(self, step: int):
    jax.profiler.stop_trace()
    if self.directory != os.fspath(self.target):
      storage.copy_tree(self.directory, self.target)
    log.info("profile of steps %d-%d written to %s", self.first, step, self.target)
    self.until = None

  def close(self):
    if self.until is not None:
      self._stop(self.until)
    if self._installed:
      signal.signal(signal.SIGUSR1, self._previous_handler or signal.SIG_DFL)
      self._installed = False
