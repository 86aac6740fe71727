"""What a run writes besides checkpoints: metrics.jsonl and TensorBoard events, each step once.

A resumed run logs again the steps after its checkpoint that the run that died had already logged.
Opening the writer at `start` removes them: metrics.jsonl keeps its lines up to `start` (rewritten
atomically), and the TensorBoard writer is opened with `purge_step=start + 1`, which records a restart
marker that makes TensorBoard drop the earlier events of steps > start. Only process 0 writes.
"""

import json
import os

import jax


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

  def __init__(self, workdir: str, start: int = 0):
    self.enabled = jax.process_index() == 0
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard_dir = os.path.join(workdir, "tensorboard")
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter
    os.makedirs(workdir, exist_ok=True)
    _drop_logged_after(self.metrics_path, start)
    self._jsonl = open(self.metrics_path, "a")
    self._tb = SummaryWriter(self.tensorboard_dir, purge_step=start + 1 if start else None)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    for key, value in metrics.items():
      if isinstance(value, list):
        for i, v in enumerate(value):
          self._tb.add_scalar(f"{key}/{i + 1}", v, step)
      elif isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
