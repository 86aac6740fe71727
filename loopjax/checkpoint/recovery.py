"""Which checkpoint a run resumes from, and what happens to one that does not restore.

A checkpoint holds days of pod time, so it is discarded only on proof (`errors.classify`):

  - the newest that restores and verifies wins; every newer one that failed *with proof of damage* is
    then moved to `<dir>-corrupt/` (kept for inspection), each named in one warning line;
  - a transient storage error is retried with doubling backoff; if it persists, the run ends
    (StorageUnavailableError, exit 75: run again later) and nothing is moved;
  - any other error (a device out of memory, a bug, a mesh that does not fit) ends the run
    (CheckpointReadError) and nothing is moved: it says nothing about the files;
  - when checkpoints exist and none restores, the run refuses to start from step 0
    (DamagedCheckpointError) unless `allow_fresh_start`, and nothing is moved.

Every process takes each decision together: each classifies what it saw, the most cautious outcome
over all processes wins (other > transient > damaged > restored), and only then does anyone act.
"""

import logging
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from loopjax.checkpoint.errors import (DAMAGED, OTHER, TRANSIENT, CheckpointReadError, DamagedCheckpointError,
                                       IncompatibleCheckpointError, StorageUnavailableError, classify, reason)
from loopjax.checkpoint.manager import Checkpointer
from loopjax.checkpoint.read import Restored

log = logging.getLogger("loopjax")

_OUTCOMES = (None, DAMAGED, TRANSIENT, OTHER)  # in order of caution: the highest any process saw wins


def _agree(outcome: str | None) -> str | None:
  """The most cautious of every process's outcome (one all-gather; none with one process)."""
  if jax.process_count() == 1:
    return outcome
  codes = multihost_utils.process_allgather(np.asarray(_OUTCOMES.index(outcome), np.int32))
  return _OUTCOMES[int(np.max(codes))]


def _attempt(ckpt: Checkpointer, step: int, items: dict, data_iter) -> tuple[str | None, object]:
  """(None, Restored) or (outcome, the error this process saw, or None if only another process failed)."""
  error = ckpt.missing_files(step, items)
  if _agree(DAMAGED if error else None) is None:
    try:
      return None, ckpt.restore(step, items, data_iter)
    except IncompatibleCheckpointError:
      raise  # the same metadata on every process: all raise it together
    except Exception as e:  # noqa: BLE001 - classified below; nothing here is swallowed unseen
      error = e
  return (classify(error) if error else None), error


def _restore_one(ckpt: Checkpointer, step: int, items: dict, data_iter, retries: int,
                 retry_seconds: float) -> Restored | str:
  """The restored checkpoint, or the one-line reason it is damaged; raises for anything else."""
  for attempt in range(retries + 1):
    outcome, result = _attempt(ckpt, step, items, data_iter)
    agreed = _agree(outcome)
    if agreed is None:
      return result
    why = reason(result) if result is not None and outcome == agreed else "another process failed to read it"
    if agreed == DAMAGED:
      return why
    if agreed == TRANSIENT and attempt < retries:
      delay = retry_seconds * 2**attempt
      log.warning("reading checkpoint step %d in %s failed (%s); retrying in %.2g s (%d of %d)", step,
                  ckpt.directory, why, delay, attempt + 1, retries)
      time.sleep(delay)
      continue
    if agreed == TRANSIENT:
      raise StorageUnavailableError(
          f"checkpoint step {step} in {ckpt.directory} could not be read after {retries + 1} tries ({why}); "
          "every checkpoint is left in place. Fix: check the storage is reachable, then run the same command "
          "again") from result
    raise CheckpointReadError(
        f"restoring checkpoint step {step} from {ckpt.directory} failed ({why}). This does not show the "
        "checkpoint is damaged, so nothing was moved. Fix: see the cause (e.g. memory, a changed mesh); run "
        "with -v for the traceback") from result
  raise AssertionError("unreachable")


def restore_latest(ckpt: Checkpointer, targets, *, retries: int = 5, retry_seconds: float = 2.0,
                   allow_fresh_start: bool = False) -> Restored | None:
  """The newest checkpoint that restores and verifies, or None when there is none (see module docstring).

  `targets(step)` gives (abstract items, data iterator or None) to restore `step` into: a staged run's
  older checkpoints may belong to a phase with other shapes and another data stream.
  """
  damaged = []
  for step in reversed(ckpt.all_steps()):
    items, data_iter = targets(step)
    result = _restore_one(ckpt, step, items, data_iter, retries, retry_seconds)
    if isinstance(result, Restored):
      for bad, _ in damaged:
        ckpt.set_aside(bad)
      return result
    log.warning("checkpoint step %d in %s is damaged (%s)%s", step, ckpt.directory, result,
                "" if ckpt.read_only else "; trying the previous one")
    damaged.append((step, result))
  if not damaged:
    return None
  listed = "; ".join(f"step {step}: {why}" for step, why in damaged)
  if not allow_fresh_start:
    raise DamagedCheckpointError(
        f"no checkpoint in {ckpt.directory} restores ({listed}); nothing was moved or trained. Fix: restore "
        "the damaged files (a backup, bucket object versioning) and run again, or start this run over from "
        "step 0 with --config.checkpoint.allow_fresh_start=True (the damaged checkpoints are then moved to "
        f"{ckpt.quarantine})")
  log.warning("no checkpoint restores (%s); starting from step 0 as checkpoint.allow_fresh_start asks, with "
              "the damaged ones moved to %s", listed, ckpt.quarantine)
  for bad, _ in damaged:
    ckpt.set_aside(bad)
  return None
