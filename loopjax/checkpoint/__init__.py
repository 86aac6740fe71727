"""Checkpoints: everything loopjax writes to or reads from a run's checkpoint directory.

  layout.py       the items of a checkpoint (params, opt_state, meta) and their Orbax handlers
  fingerprint.py  checksums and leaf shapes recorded at save, checked at restore
  errors.py       the error classes, and `classify`: is a failed restore proof of damage?
  manager.py      Checkpointer: the run's (async) saves and verified restores, one line per fault
  recovery.py     restore_latest: which checkpoint a run resumes from; retries; what is set aside
  read.py         read-only access (eval, generate, export-hf): newest meta, params only
  listing.py      step_dirs, the one walk behind every listing (`loopjax checkpoints`, pick_step)
  files.py        one array's files through tensorstore, for tools that stream (upscale, export-hf)
  upscale.py      layer duplication from checkpoint to checkpoint (`loopjax upscale`)

Orbax's public API covers saving, restoring and listing; `files.py` is the one place that opens an
item's stored arrays directly (BUILD.md says why).
"""

from loopjax.checkpoint.errors import (CheckpointError, CheckpointReadError, CheckpointWriteError,
                                       DamagedCheckpointError, IncompatibleCheckpointError, NonFiniteStateError,
                                       StorageUnavailableError)
from loopjax.checkpoint.fingerprint import abstract_like, fingerprint, leaf_shapes
from loopjax.checkpoint.layout import ARRAY_ITEMS
from loopjax.checkpoint.manager import Checkpointer, data_state
from loopjax.checkpoint.read import Restored, read_meta, reader, restore_params
from loopjax.checkpoint.recovery import restore_latest

__all__ = ["ARRAY_ITEMS", "CheckpointError", "CheckpointReadError", "CheckpointWriteError", "Checkpointer",
           "DamagedCheckpointError", "IncompatibleCheckpointError", "NonFiniteStateError", "Restored",
           "StorageUnavailableError", "abstract_like", "data_state", "fingerprint", "leaf_shapes", "read_meta",
           "reader", "restore_latest", "restore_params"]
