"""The host side of a step's input: a phase's stream taken in step-sized batches, made into global arrays.

A phase's data stream yields batches of `unit_rows` rows (the gcd of its segments' batch sizes); a step of
a segment with more rows concatenates several, so a batch ramp never restarts the stream.
"""

import jax
import numpy as np

from loopjax import sharding
from loopjax.train import step as step_lib


def global_batch(local_batch: dict, mesh) -> dict:
  """Process-local numpy rows -> one global jax.Array per key, sharded on the batch axes."""
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local_batch[k]))
          for k in step_lib.BATCH_KEYS}


class Rows:
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
