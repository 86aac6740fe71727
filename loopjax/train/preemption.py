"""SIGTERM / SIGINT during training: finish the step in flight, save, stop (at the same step everywhere).

The run then ends with exit code 75 (EX_TEMPFAIL, loopjax/cli/errors.py), not 0: a scheduler must read
"preempted, run again" differently from "finished".
"""

import logging
import os
import signal

import jax

from loopjax import checkpoint as checkpoint_lib

log = logging.getLogger("loopjax")


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
    """Ask once per step on every process (multi-process: a collective sync point)."""
    reached = self._ckpt.reached_preemption(step)
    return reached or (not self._multi and self.signal is not None)
