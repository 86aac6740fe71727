"""Checkpoints: an Orbax CheckpointManager over train-state pytrees, the grain iterator and run metadata.

A checkpoint at step N is the directory `<dir>/N` with one Orbax item per part:
  params, opt_state  pytrees of (sharded) arrays, PyTreeSave/PyTreeRestore (zstd only when asked);
  meta               JSON: step, phase, the resolved config, loop counters, a checksum per array item, and
                     the data iterator's state: every process's {data shard: grain state}, gathered, so
                     a run with another process count (dividing data.num_shards) resumes the same stream.

Why a checksum: Orbax makes saves atomic (a tmp directory renamed when every process has finished), so
a save killed midway never looks finished. It does not detect a finished checkpoint damaged later
(files removed or truncated, bits flipped). The checksum is the uint32 sum of every array's bit
pattern: integer sums are exact in any reduction order, so it is identical on any mesh or device
count, and a restore that reads damaged data fails it. `restore_latest` walks back from the newest
step, moves any checkpoint that fails to restore or verify into `<dir>-corrupt/`, and says so.

Why uncompressed by default: Orbax's zstd pass shrinks float training state by only 8-20% but is
much of an async save's CPU work, which competes with the train step for the host's cores
(BENCHMARKS.md). `compress=True` trades that CPU for bytes (a bucket billed by size). Either kind
restores with any setting: the codec is read from each array's metadata.

Saves refuse non-finite arrays, so a checkpoint never holds a NaN or Inf. This module takes pytrees
and abstract targets only; it knows nothing of the model or the train state's layout.
"""

import contextlib
import dataclasses
import datetime
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies
from orbax.checkpoint._src.metadata.checkpoint_info import CheckpointInfo

from loopjax import storage

log = logging.getLogger("loopjax")

ARRAY_ITEMS = ("params", "opt_state")


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read; the message says what and what to do."""


class IncompatibleCheckpointError(CheckpointError):
  """The checkpoint is readable but holds other shapes than the config asks for (never "damaged")."""


class NonFiniteStateError(CheckpointError):
  """The state to save holds NaN or Inf: nothing was written."""


class _EveryInterval(policies.ContinuousCheckpointingPolicy):
  """Orbax's time-based policy (decided on process 0, broadcast), counting from the run's start.

  The parent saves at once when no checkpoint exists yet; a time interval should start with the run.
  """

  def __init__(self, minimum_interval_secs: int):
    super().__init__(minimum_interval_secs=minimum_interval_secs)
    self._start = datetime.datetime.now(tz=datetime.timezone.utc)

  def should_save(self, step, previous_steps, *, context):
    if not previous_steps:
      previous_steps = [CheckpointInfo(step=-1, time=self._start, metrics=None)]
    return super().should_save(step, previous_steps, context=context)


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


def _bits_u32(x: jax.Array) -> jax.Array:
  """The bit pattern of every element as uint32 (narrower types zero-extended)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = jnp.dtype(f"uint{x.dtype.itemsize * 8}")
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _fingerprint(tree) -> tuple[jax.Array, jax.Array]:
  """(uint32 checksum, all finite) of a pytree of arrays; the same on any sharding."""
  leaves = jax.tree.leaves(tree)
  checksum = sum((jnp.sum(_bits_u32(x), dtype=jnp.uint32) for x in leaves), jnp.uint32(0))
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                              if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.bool_(True)]))
  return checksum, finite


def _np_checksum(tree) -> int:
  """`_fingerprint`'s checksum, computed on host numpy arrays (for offline verification)."""
  total = np.uint32(0)
  for x in jax.tree.leaves(tree):
    x = np.asarray(x)
    bits = x.astype(np.uint32) if x.dtype == np.bool_ else x.view(f"uint{x.dtype.itemsize * 8}")
    total = np.uint32((int(total) + int(np.sum(bits.astype(np.uint32), dtype=np.uint32))) % 2**32)
  return int(total)


def fingerprint(tree) -> tuple[int, bool]:
  checksum, finite = _fingerprint(tree)
  return int(checksum), bool(finite)


def abstract_like(tree, shardings) -> object:
  """ShapeDtypeStructs of `tree` (arrays or structs) carrying the target `shardings`: a restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def leaf_shapes(tree) -> dict:
  """Dotted leaf name -> "shape dtype" of a pytree of arrays or structs (stored in meta at save)."""
  def name(path):
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {name(path): f"{tuple(x.shape)} {np.dtype(x.dtype).name}" for path, x in leaves}


def _all_processes_agree(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _handlers(compress: bool = False) -> dict:
  handlers = {name: ocp.PyTreeCheckpointHandler(use_compression=compress) for name in ARRAY_ITEMS}
  handlers["meta"] = ocp.JsonCheckpointHandler()
  return handlers


def _restore_args(target) -> ocp.args.PyTreeRestore:
  """Restores the pytree `target` describes: ShapeDtypeStructs with shardings, or numpy arrays (host)."""
  return ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


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


@dataclasses.dataclass
class Restored:
  step: int
  items: dict  # item name -> restored pytree
  meta: dict


class Checkpointer:
  """Saves and restores checkpoints under one directory; every JAX process must call every method."""

  def __init__(self, directory: str, *, every_steps: int = 0, every_minutes: float = 0.0, keep: int = 3,
               keep_period: int = 0, async_save: bool = True, read_only: bool = False,
               keep_steps: tuple[int, ...] = (), compress: bool = False):
    self.directory, self.read_only = storage.run_path(directory), read_only
    self.quarantine = self.directory.parent / f"{self.directory.name}-corrupt"
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
      self._manager = _Manager(self.directory, options=options, item_handlers=_handlers(compress))
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

    Raises NonFiniteStateError before writing anything if an array holds NaN/Inf, and CheckpointError
    if the disk refuses the write (earlier checkpoints stay as they were).
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
    with self._write_errors(step):
      self._manager.save(step, args=ocp.args.Composite(**args), force=True)

  def wait(self):
    """Blocks until the async save in flight (if any) is on disk."""
    with self._write_errors(self._manager.latest_step()):
      self._manager.wait_until_finished()

  def close(self):
    with self._write_errors(self._manager.latest_step()):
      self._manager.close()

  @contextlib.contextmanager
  def _write_errors(self, step):
    """Storage errors from Orbax (raised now or by the async save in flight) -> one clear error."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - tensorstore/OS errors come as many types
      raise CheckpointError(
          f"writing the checkpoint of step {step} to {self.directory} failed: {type(e).__name__}: {e}. "
          "Earlier checkpoints are untouched. Fix: free disk space or make the directory writable, then "
          "restart (training resumes from the newest complete checkpoint)") from e

  def restore(self, step: int, abstract_items: dict, data_iter=None) -> Restored:
    """Restores `abstract_items` (name -> pytree of ShapeDtypeStructs with target shardings) at `step`.

    The target shardings may describe any mesh: arrays are resharded as they are read. Raises
    CheckpointError when the restored arrays fail the checksum written at save time.
    """
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    for name, tree in abstract_items.items():
      saved, wanted = meta["shapes"][name], leaf_shapes(tree)
      if saved != wanted:
        diff = sorted(set(saved.items()) ^ set(wanted.items()))[:4]
        raise IncompatibleCheckpointError(
            f"checkpoint step {step} in {self.directory} does not fit this config: '{name}' differs in "
            f"(leaf, shape dtype) {diff}. Fix: resume with the config stored in the checkpoint "
            f"({self.directory}/{step}/meta/metadata) or start in a new --workdir")
    args = {name: _restore_args(tree) for name, tree in abstract_items.items()}
    args["meta"] = ocp.args.JsonRestore()
    out = self._manager.restore(step, args=ocp.args.Composite(**args))
    meta = out["meta"]
    for name in abstract_items:
      checksum, finite = fingerprint(out[name])
      if checksum != meta["checksums"][name] or not finite:
        raise CheckpointError(f"checkpoint step {step}: '{name}' fails its checksum (saved "
                              f"{meta['checksums'][name]}, read {checksum}, finite={finite})")
    if data_iter is not None:
      try:
        data_iter.set_state(meta["data_state"])
      except (KeyError, ValueError) as e:
        raise IncompatibleCheckpointError(
            f"checkpoint step {step} in {self.directory}: its data state does not fit this run ({e}). Fix: "
            "resume with the data.num_shards and data.source it was saved with") from e
    return Restored(step, {name: out[name] for name in abstract_items}, meta)

  def restore_latest(self, abstract_items: dict, data_iter=None) -> Restored | None:
    """The newest checkpoint that restores and verifies; bad ones are reported and set aside."""
    for step in reversed(self.all_steps()):
      error, restored = self._missing_files(step, abstract_items), None
      if _all_processes_agree(error is None):
        try:
          restored = self.restore(step, abstract_items, data_iter)
        except IncompatibleCheckpointError:
          raise
        except Exception as e:  # noqa: BLE001 - storage errors come as many types; all mean "unreadable"
          error = e
        if _all_processes_agree(error is None):
          return restored
      error = error or CheckpointError("another process could not read it")
      log.warning("checkpoint step %d in %s is damaged (%s: %s); moving it to %s and falling back to the "
                  "previous checkpoint", step, self.directory, type(error).__name__, error,
                  "nowhere (read-only)" if self.read_only else self.quarantine)
      self._set_aside(step)
    return None

  def _missing_files(self, step: int, abstract_items: dict) -> CheckpointError | None:
    """The metadata files a restore opens first, checked without any collective and agreed on before
    one: on a bucket, processes may see a removed file at different points (one fails before Orbax's
    restore barrier, another inside it), and a restore failing at different barriers crashes them all."""
    root = self.directory / str(step)
    for path in [root / name / "_METADATA" for name in abstract_items] + [root / "meta" / "metadata"]:
      if not path.exists():
        return CheckpointError(f"{path} is missing")
    return None

  def _set_aside(self, step: int):
    """Moves a damaged checkpoint out of Orbax's sight (kept for inspection) so the step can be redone."""
    if self.read_only:
      return
    if jax.process_index() == 0:
      self.quarantine.mkdir(parents=True, exist_ok=True)
      target = self.quarantine / f"{step}-{int(time.time())}"
      storage.move(self.directory / str(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"loopjax_set_aside_{step}")
      storage.forget_listings(self.directory)  # the other processes' cached listings still hold the step
    self._manager.reload()


def reader(directory: str) -> ocp.CheckpointManager:
  """A read-only manager of the checkpoints in `directory` (local or gs://)."""
  return ocp.CheckpointManager(storage.run_path(directory), options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers=_handlers())


def read_meta(directory: str, step: int | None = None) -> tuple[int, dict]:
  """(step, metadata: phase, resolved config, ...) of the newest (or `step`) checkpoint; reads no arrays."""
  manager = reader(directory)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no complete checkpoint in {directory}. Fix: train first, or check the path")
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  manager.close()
  return step, meta


def restore_params(directory: str, abstract_params=None, step: int | None = None) -> Restored:
  """Only the parameters of the newest (or `step`) checkpoint, verified: for evaluation and export.

  With `abstract_params` (ShapeDtypeStructs with shardings) arrays land on that mesh; without, they
  come back as host numpy arrays.
  """
  manager = reader(directory)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no complete checkpoint in {directory}. Fix: train first, or check the path")
  if abstract_params is None:
    metadata = manager.item_metadata(step)["params"]
    abstract_params = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), metadata)
  args = ocp.args.Composite(params=_restore_args(abstract_params), meta=ocp.args.JsonRestore())
  out = manager.restore(step, args=args)
  params, meta = out["params"], out["meta"]
  checksum = _np_checksum(params) if isinstance(jax.tree.leaves(params)[0], np.ndarray) else fingerprint(params)[0]
  if checksum != meta["checksums"]["params"]:
    raise CheckpointError(f"checkpoint step {step} in {directory}: params fail their checksum. Fix: restore "
                          "an earlier step (`loopjax checkpoints` lists them)")
  manager.close()
  return Restored(step, {"params": params}, meta)
