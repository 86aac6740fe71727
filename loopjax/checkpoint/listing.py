"""Which checkpoints a directory holds: one walk (`step_dirs`) behind every listing loopjax makes.

`loopjax checkpoints` shows every step directory, finished or not, with its size and phase; tools
that read a checkpoint (upscale, export-hf, init.from_checkpoint) pick a finished step. A run's
directory may be local or on gs:// (walked through epath).
"""

import dataclasses

from etils import epath
import orbax.checkpoint as ocp

from loopjax import storage
from loopjax.checkpoint.errors import CheckpointError
from loopjax.checkpoint.read import reader


@dataclasses.dataclass(frozen=True)
class StepDir:
  step: int
  path: epath.Path
  finished: bool  # Orbax finalised the save (renamed into place; on a bucket, commit_success.txt written)


def step_dirs(directory) -> list[StepDir]:
  """Every checkpoint step directory under `directory` (finished or not), by step."""
  path = storage.run_path(directory)
  found = []
  for child in (path.iterdir() if path.is_dir() else []):
    try:
      step = ocp.path.step.step_from_checkpoint_name(child.name)
    except ValueError:
      continue  # not a checkpoint
    found.append(StepDir(step, child, storage.is_finished_step(child)))
  return sorted(found, key=lambda d: (d.step, d.finished))


def complete_steps(directory: str) -> list[int]:
  """The steps with a finished checkpoint in `directory` (a run's WORKDIR/checkpoints), ascending."""
  return [d.step for d in step_dirs(directory) if d.finished]


def pick_step(directory: str, step: int | None, flag: str) -> int:
  """`step`, or the newest finished step, of `directory`; CheckpointError naming `flag` otherwise."""
  steps = complete_steps(directory)
  if not steps or (step is not None and step not in steps):
    where = directory if step is None else f"{directory} at step {step}"
    raise CheckpointError(f"{flag}: no complete checkpoint in {where} (complete steps there: {steps or 'none'}). "
                          "Fix: give a run's workdir or its checkpoints directory (`loopjax checkpoints WORKDIR`)")
  return steps[-1] if step is None else step


def _size(path: epath.Path) -> int:
  """Bytes under `path`, walked with iterdir (epath's walk drops the gs:// of the paths it yields)."""
  return sum(_size(p) if p.is_dir() else p.stat().length for p in path.iterdir())


def list_checkpoints(directory: str) -> list[dict]:
  """Every checkpoint directory under `directory`: step, phase, bytes, complete, path, note.

  "complete" means Orbax finalised it and its metadata and items are all present; it does not read
  the arrays (restore does, and checks their checksums).
  """
  dirs = step_dirs(directory)
  manager = reader(directory) if any(d.finished for d in dirs) else None
  rows = []
  for d in dirs:
    row = {"step": d.step, "phase": "?", "bytes": _size(d.path), "complete": False, "path": str(d.path)}
    if not d.finished:
      row["note"] = "unfinished save (the process died while writing)"
    else:
      missing = [item for item in ("params", "opt_state", "meta") if not (d.path / item).is_dir()]
      try:
        meta = manager.restore(d.step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        row["phase"] = meta["phase"]
        row["complete"] = not missing
        row["note"] = f"missing {missing}" if missing else ""
      except Exception as e:  # noqa: BLE001 - any unreadable metadata means "not usable"
        row["note"] = f"unreadable metadata: {type(e).__name__}"
    rows.append(row)
  if manager is not None:
    manager.close()
  return rows
