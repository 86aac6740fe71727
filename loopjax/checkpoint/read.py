"""Read-only access to a run's checkpoints, for commands that take no lease on the run: eval,
generate, export-hf, `loopjax checkpoints`, and init.from_checkpoint of another run."""

import dataclasses

import jax
import numpy as np
import orbax.checkpoint as ocp

from loopjax import storage
from loopjax.checkpoint import layout
from loopjax.checkpoint.errors import CheckpointError, DamagedCheckpointError
from loopjax.checkpoint.fingerprint import fingerprint, host_checksum


@dataclasses.dataclass
class Restored:
  step: int
  items: dict  # item name -> restored pytree
  meta: dict


def reader(directory: str) -> ocp.CheckpointManager:
  """A read-only Orbax manager of the checkpoints in `directory` (local or gs://)."""
  return ocp.CheckpointManager(storage.run_path(directory), options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers=layout.handlers())


def _newest(manager, directory: str, step: int | None) -> int:
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no complete checkpoint in {directory}. Fix: train first, or check the path")
  return step


def read_meta(directory: str, step: int | None = None) -> tuple[int, dict]:
  """(step, metadata: phase, resolved config, ...) of the newest (or `step`) checkpoint; reads no arrays."""
  manager = reader(directory)
  step = _newest(manager, directory, step)
  meta = manager.restore(step, args=layout.meta_only())["meta"]
  manager.close()
  return step, meta


def restore_params(directory: str, abstract_params=None, step: int | None = None) -> Restored:
  """Only the parameters of the newest (or `step`) checkpoint, verified: for evaluation and export.

  With `abstract_params` (ShapeDtypeStructs with shardings) arrays land on that mesh; without, they
  come back as host numpy arrays.
  """
  manager = reader(directory)
  step = _newest(manager, directory, step)
  if abstract_params is None:
    metadata = manager.item_metadata(step)["params"]
    abstract_params = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), metadata)
  args = ocp.args.Composite(params=layout.restore_args(abstract_params), meta=ocp.args.JsonRestore())
  out = manager.restore(step, args=args)
  params, meta = out["params"], out["meta"]
  on_host = isinstance(jax.tree.leaves(params)[0], np.ndarray)
  checksum = host_checksum(params) if on_host else fingerprint(params)[0]
  if checksum != meta["checksums"]["params"]:
    raise DamagedCheckpointError(f"checkpoint step {step} in {directory}: params fail their checksum. Fix: "
                                 "restore an earlier step (`loopjax checkpoints` lists them)")
  manager.close()
  return Restored(step, {"params": params}, meta)
