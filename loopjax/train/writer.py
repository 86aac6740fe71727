"""What a run writes besides checkpoints: metrics.jsonl and TensorBoard events, each step once.

A resumed run logs again the steps after its checkpoint that the run that died had already logged.
Opening the writer at `start` removes them: metrics.jsonl keeps its lines up to `start` (rewritten
atomically), and the TensorBoard writer is opened with `purge_step=start + 1`, which records a restart
marker that makes TensorBoard drop the earlier events of steps > start. Only process 0 writes.

On an object store (gs://) both are written to a local staging directory and uploaded whole
(`storage.Staged`) at every checkpoint save, every SYNC_SECONDS and at close: a metrics line that a
checkpoint covers is in the bucket before the checkpoint is, so a resume never leaves a gap.

A write that fails (a full disk, a vanished bucket) ends the run with one MetricsWriteError line.
TensorBoard is one of `train.trackers` (on by default); W&B and MLflow get each row too (`trackers.py`).
"""

import contextlib
import json
import os
import time

import jax

from loopjax import storage

SYNC_SECONDS = 30.0


class MetricsWriteError(OSError):
  """metrics.jsonl or the TensorBoard events could not be written; the checkpoints are not affected."""
  exit_code = 3  # a fault during the run (loopjax/cli/errors.py)


def _drop_logged_after(path: str, step: int):
  """Keeps the metrics.jsonl lines up to `step`."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
  if len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


class MetricWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, start: int = 0, tensorboard: bool = True, trackers=None):
    self.enabled = jax.process_index() == 0
    self._trackers = trackers  # trackers.Trackers (process 0's) or None
    target = storage.run_path(workdir)
    self.metrics_path = os.fspath(target / "metrics.jsonl")
    self.tensorboard_dir = os.fspath(target / "tensorboard")
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter
    self._staged = storage.Staged(target, files=("metrics.jsonl",))
    local_metrics = os.path.join(self._staged.local, "metrics.jsonl")
    _drop_logged_after(local_metrics, start)
    self._jsonl = open(local_metrics, "a")
    self._tb = (SummaryWriter(os.path.join(self._staged.local, "tensorboard"), purge_step=start + 1 if start else None)
                if tensorboard else None)
    self._synced_at = time.monotonic()

  @contextlib.contextmanager
  def _faults(self, step=None):
    try:
      yield
    except OSError as e:
      at = f" at step {step}" if step is not None else ""
      raise MetricsWriteError(f"writing metrics to {self.metrics_path}{at} failed: {e}. The checkpoints are "
                              "not affected. Fix: free space on that disk or make it writable, then run the "
                              "same command again (it resumes from the newest checkpoint)") from e

  def write(self, step: int, metrics: dict):
    if self.enabled:
      with self._faults(step):
        self._write(step, metrics)

  def _write(self, step: int, metrics: dict):
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    if self._trackers is not None:
      self._trackers.write(step, metrics)
    for key, value in metrics.items() if self._tb is not None else ():
      if isinstance(value, list):
        for i, v in enumerate(value):
          self._tb.add_scalar(f"{key}/{i + 1}", v, step)
      elif isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)
    if self._tb is not None:
      self._tb.flush()
    if time.monotonic() - self._synced_at > SYNC_SECONDS:
      self.sync()

  def sync(self):
    """Makes everything written so far visible in the run directory (a no-op on a local disk)."""
    if self.enabled:
      with self._faults():
        self._staged.sync()
      self._synced_at = time.monotonic()

  def close(self):
    """Closes every file, even when one fails (the first failure is raised after)."""
    if self.enabled:
      with self._faults(), contextlib.ExitStack() as stack:
        stack.callback(self._staged.close)
        if self._tb is not None:
          stack.callback(self._tb.close)
        if self._trackers is not None:
          stack.callback(self._trackers.close)
        stack.callback(self._jsonl.close)
