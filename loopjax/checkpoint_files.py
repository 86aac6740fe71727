"""A saved checkpoint's files read directly, for tools that stream one array at a time (upscale, export).

Orbax writes each array item (params, opt_state) of step N as `<dir>/N/<item>`: an OCDBT key-value
store of zarr arrays named by their dotted tree path ("stack.wq", "1.0.mu.stack.wq"), plus small JSON
metadata files. It gives a step directory its plain name only once the save is complete. Tensorstore
is the library Orbax writes them with, so reading a chunk here costs what a restore would.

Directories are local or gs:// (`loopjax.storage`): tensorstore reads a bucket through its gcs driver.
"""

import numpy as np
import tensorstore as ts

from loopjax import storage
from loopjax.checkpoint import CheckpointError


def complete_steps(directory: str) -> list[int]:
  """The steps with a complete checkpoint in `directory` (a run's WORKDIR/checkpoints), ascending."""
  path = storage.run_path(directory)
  steps = path.iterdir() if path.is_dir() else []
  return sorted(int(p.name) for p in steps if storage.is_finished_step(p))


def pick_step(directory: str, step: int | None, flag: str) -> int:
  """`step`, or the newest complete step, of `directory`; CheckpointError naming `flag` otherwise."""
  steps = complete_steps(directory)
  if not steps or (step is not None and step not in steps):
    where = directory if step is None else f"{directory} at step {step}"
    raise CheckpointError(f"{flag}: no complete checkpoint in {where} (complete steps there: {steps or 'none'}). "
                          "Fix: give a run's workdir or its checkpoints directory (`loopjax checkpoints WORKDIR`)")
  return steps[-1] if step is None else step


def kvstore(item_dir: str) -> dict:
  """The tensorstore spec of one item's key-value store."""
  return {"driver": "ocdbt", "base": storage.kvstore_url(item_dir)}


def open_array(item_dir: str, name: str, context: ts.Context | None = None, **mode) -> ts.TensorStore:
  """The stored array `name` of an item (mode: read=True or write=True)."""
  spec = {"driver": "zarr", "kvstore": dict(kvstore(item_dir), path=name)}
  return ts.open(spec, context=context or ts.Context(), **(mode or {"read": True})).result()


def bits_sum(x: np.ndarray) -> int:
  """The uint32 sum of x's bit patterns: one array's part of a checkpoint item's checksum (which is additive)."""
  bits = x.astype(np.uint32) if x.dtype == np.bool_ else x.view(f"uint{x.dtype.itemsize * 8}")
  return int(np.sum(bits, dtype=np.uint32))
