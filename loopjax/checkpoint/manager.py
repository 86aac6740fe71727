"""The run's checkpointer: an Orbax CheckpointManager over the items of `layout`, with verified restores.

Why a checksum: Orbax makes saves atomic (a tmp directory renamed when every process has finished), so
a save killed midway never looks finished. It does not detect a finished checkpoint damaged later
(files removed or truncated, bits flipped). Every save records each array item's checksum and leaf
shapes (`fingerprint`); a restore that reads damaged data fails the checksum. Which checkpoint a run
resumes from, and what happens to one that fails, is `recovery.restore_latest`.

Saves refuse non-finite arrays, so a checkpoint never holds a NaN or Inf. A save that fails (disk
full, permission denied, a bucket gone) raises one CheckpointWriteError naming the step that was being
written: with async saves that is the save in flight, whose failure shows at the next wait or save.
This module takes pytrees and abstract targets only; it knows nothing of the model or the train state.
"""

import contextlib
import dataclasses
import datetime
import json
import logging
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from loopjax import storage
from loopjax.checkpoint import layout
from loopjax.checkpoint.errors import (CheckpointError, CheckpointWriteError, DamagedCheckpointError,
                                       IncompatibleCheckpointError, NonFiniteStateError, reason)
from loopjax.checkpoint.fingerprint import fingerprint, leaf_shapes
from loopjax.checkpoint.read import Restored

log = logging.getLogger("loopjax")


@dataclasses.dataclass(frozen=True)
class _RunStart:
  """A PolicyCheckpointInfo for "the run started here" (no checkpoint yet)."""
  time: datetime.datetime
  step: int = -1
  metrics: dict | None = None


class _EveryInterval(policies.ContinuousCheckpointingPolicy):
  """Orbax's time-based policy (decided on process 0, broadcast), counting from the run's start.

  The parent saves at once when no checkpoint exists yet; a time interval should start with the run.
  """

  def __init__(self, minimum_interval_secs: int):
    super().__init__(minimum_interval_secs=minimum_interval_secs)
    self._start = _RunStart(datetime.datetime.now(tz=datetime.timezone.utc))

  def should_save(self, step, previous_steps, *, context):
    return super().should_save(step, previous_steps or [self._start], context=context)


class _Manager(ocp.CheckpointManager):
  """Asks JAX's preemption sync point at most once per step.

  The sync point counts calls, not steps, and `should_save`/`save` ask it too: answering repeat
  questions from a cache keeps the one call per step the protocol needs on every process.
  """

  _preemption: tuple[int | None, bool] = (None, False)

  def reached_preemption(self, step: int) -> bool:
    if self._preemption[0] != step:
      self._preemption = (step, super().reached_preemption(step))
    return self._preemption[1]


def _gather_json(obj) -> list:
  """Every process's JSON-serialisable `obj`, in process order (one all-gather of padded bytes)."""
  if jax.process_count() == 1:
    return [obj]
  encoded = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([encoded.size], np.int32))).ravel()
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:encoded.size] = encoded
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:n])) for row, n in zip(rows, lengths)]


def data_state(data_iter) -> dict:
  """The state of every process's data shards, merged: {shard: grain state} (same on all processes)."""
  merged = {}
  for part in _gather_json(data_iter.get_state()):
    merged.update(part)
  return merged


def _write_fix(error: BaseException) -> str:
  text = reason(error, limit=10_000)
  if "No space left" in text or "os_error_code='28'" in text or getattr(error, "errno", None) == 28:
    return "free space on that disk (or lower checkpoint.keep), then run the same command again"
  if "PERMISSION_DENIED" in text or "Permission denied" in text or "403" in text:
    return "make the directory writable (or give credentials that may write the bucket), then run again"
  return "check the storage (is the directory or bucket still there and writable?), then run again"


class Checkpointer:
  """Saves and restores checkpoints under one directory; every JAX process must call every method."""

  def __init__(self, directory: str, *, every_steps: int = 0, every_minutes: float = 0.0, keep: int = 3,
               keep_period: int = 0, async_save: bool = True, read_only: bool = False,
               keep_steps: tuple[int, ...] = (), compress: bool = False):
    self.directory, self.read_only = storage.run_path(directory), read_only
    self.quarantine = self.directory.parent / f"{self.directory.name}-corrupt"
    self._in_flight = None  # the step of the async save not yet known to be on disk
    self._write_failed = False  # a CheckpointWriteError was raised: close() then only releases resources
    save_policies = []
    if every_steps:
      save_policies.append(policies.FixedIntervalPolicy(every_steps))
    if every_minutes:
      save_policies.append(_EveryInterval(max(1, round(every_minutes * 60))))
    preserve = [policies.LatestN(keep)] + ([policies.EveryNSteps(keep_period)] if keep_period else [])
    if keep_steps:  # a staged recipe's phase boundaries, kept permanently
      preserve.append(policies.CustomSteps(list(keep_steps)))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy(save_policies),
        preservation_policy=None if read_only else policies.AnyPreservationPolicy(preserve),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
        create=not read_only, read_only=read_only)
    try:
      if not read_only:
        self._report_interrupted_saves()
      self._manager = _Manager(self.directory, options=options, item_handlers=layout.handlers(compress))
    except OSError as e:
      raise CheckpointError(f"cannot use checkpoint directory {self.directory}: {e}. Fix: point --workdir "
                            "at a writable directory with free space") from e

  def _report_interrupted_saves(self):
    if jax.process_index() == 0 and self.directory.exists():
      for path in sorted(self.directory.iterdir()):
        if ocp.path.step.is_tmp_checkpoint(path):
          log.warning("checkpoint %s was never finished (the process died while saving); ignoring and "
                      "removing it", path)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """JAX's multi-host preemption sync point (False without a coordination service). Ask every step."""
    return self._manager.reached_preemption(step)

  def should_save(self, step: int) -> bool:
    """The every-N-steps / every-M-minutes policy; the same answer on every process."""
    return self._manager.should_save(step)

  def save(self, step: int, items: dict, *, meta: dict, data_iter=None):
    """Starts an (async) save of `items` (name -> pytree of arrays), the iterator state and `meta`.

    Raises NonFiniteStateError before writing anything if an array holds NaN/Inf, and
    CheckpointWriteError if the storage refuses this write or refused the previous one.
    """
    checksums = {}
    for name, tree in items.items():
      checksums[name], finite = fingerprint(tree)
      if not finite:
        raise NonFiniteStateError(
            f"refusing to save the checkpoint of step {step}: '{name}' holds NaN or Inf; the previous "
            f"checkpoints in {self.directory} are untouched. Fix: set --config.train.nan_policy=stop to "
            "stop at the first bad step, lower optim.lr, or restart from the last checkpoint")
    args = {name: ocp.args.PyTreeSave(tree) for name, tree in items.items()}
    shapes = {name: leaf_shapes(tree) for name, tree in items.items()}
    data = {} if data_iter is None else {"data_state": data_state(data_iter)}
    args["meta"] = ocp.args.JsonSave(dict(meta, step=step, checksums=checksums, shapes=shapes,
                                          saved_at=time.time(), **data))
    self.wait()  # Orbax would wait inside save(); here a failure of the previous save names its own step
    self._in_flight = step
    with self._write_errors():
      self._manager.save(step, args=ocp.args.Composite(**args), force=True)

  def wait(self):
    """Blocks until the async save in flight (if any) is on disk."""
    with self._write_errors():
      self._manager.wait_until_finished()
    self._in_flight = None

  def close(self):
    """Waits for the save in flight and releases the manager. After a failed save, whose error was already
    raised, the same failure is not raised a second time."""
    reported = self._write_failed
    try:
      with self._write_errors():
        self._manager.close()
    except CheckpointWriteError:
      if not reported:
        raise
    self._in_flight = None

  @contextlib.contextmanager
  def _write_errors(self):
    """Storage errors from Orbax (raised now or by the async save in flight) -> one CheckpointWriteError."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - tensorstore/OS errors come as many types
      step, self._write_failed = self._in_flight, True
      where = f"{self.directory}/{step}" if step is not None else str(self.directory)
      raise CheckpointWriteError(
          f"saving the checkpoint of step {step} to {where} failed: {reason(e)}. Earlier checkpoints are "
          f"untouched and the unfinished one is removed at the next start. Fix: {_write_fix(e)}") from e

  def restore(self, step: int, abstract_items: dict, data_iter=None) -> Restored:
    """Restores `abstract_items` (name -> pytree of ShapeDtypeStructs with target shardings) at `step`.

    The target shardings may describe any mesh: arrays are resharded as they are read. Raises
    IncompatibleCheckpointError when the checkpoint holds other shapes, DamagedCheckpointError when the
    restored arrays fail the checksum written at save time; storage errors propagate as they come.
    """
    meta = self._manager.restore(step, args=layout.meta_only())["meta"]
    for name, tree in abstract_items.items():
      saved, wanted = meta["shapes"][name], leaf_shapes(tree)
      if saved != wanted:
        diff = sorted(set(saved.items()) ^ set(wanted.items()))[:4]
        raise IncompatibleCheckpointError(
            f"checkpoint step {step} in {self.directory} does not fit this config: '{name}' differs in "
            f"(leaf, shape dtype) {diff}. Fix: resume with the config stored in the checkpoint "
            f"({self.directory}/{step}/meta/metadata) or start in a new --workdir")
    args = {name: layout.restore_args(tree) for name, tree in abstract_items.items()}
    args["meta"] = ocp.args.JsonRestore()
    out = self._manager.restore(step, args=ocp.args.Composite(**args))
    meta = out["meta"]
    for name in abstract_items:
      checksum, finite = fingerprint(out[name])
      if checksum != meta["checksums"][name] or not finite:
        raise DamagedCheckpointError(f"'{name}' fails its checksum (saved {meta['checksums'][name]}, read "
                                     f"{checksum}, finite={finite})")
    if data_iter is not None:
      try:
        data_iter.set_state(meta["data_state"])
      except (KeyError, ValueError) as e:
        raise IncompatibleCheckpointError(
            f"checkpoint step {step} in {self.directory}: its data state does not fit this run ({e}). Fix: "
            "resume with the data.num_shards and data.source it was saved with") from e
    return Restored(step, {name: out[name] for name in abstract_items}, meta)

  def missing_files(self, step: int, items) -> DamagedCheckpointError | None:
    """The metadata files a restore opens first, checked without any collective and agreed on before
    one: on a bucket, processes may see a removed file at different points (one fails before Orbax's
    restore barrier, another inside it), and a restore failing at different barriers crashes them all."""
    root = self.directory / str(step)
    for path in [root / name / "_METADATA" for name in items] + [root / "meta" / "metadata"]:
      if not path.exists():
        return DamagedCheckpointError(f"{path} is missing")
    return None

  def set_aside(self, step: int):
    """Moves a damaged checkpoint out of Orbax's sight (kept for inspection) so the step can be redone."""
    if self.read_only:
      return
    if jax.process_index() == 0:
      self.quarantine.mkdir(parents=True, exist_ok=True)
      storage.move(self.directory / str(step), self.quarantine / f"{step}-{int(time.time())}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"loopjax_set_aside_{step}")
      storage.forget_listings(self.directory)  # the other processes' cached listings still hold the step
    self._manager.reload()
