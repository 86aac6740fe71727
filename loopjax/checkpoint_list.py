"""What `loopjax checkpoints` shows: every checkpoint directory of a run, finished or not, with its size.

Walks the directory through epath, so a run on gs:// is listed like a local one.
"""

from etils import epath
import orbax.checkpoint as ocp

from loopjax import checkpoint as checkpoint_lib
from loopjax import storage


def _size(path: epath.Path) -> int:
  """Bytes under `path`, walked with iterdir (epath's walk drops the gs:// of the paths it yields)."""
  return sum(_size(p) if p.is_dir() else p.stat().length for p in path.iterdir())


def list_checkpoints(directory: str) -> list[dict]:
  """Every checkpoint directory under `directory` (finished or not): step, phase, bytes, complete, note.

  "complete" means Orbax finalised it and its metadata and items are all present; it does not read
  the arrays (restore does, and checks their checksums).
  """
  if not storage.run_path(directory).exists():
    return []
  manager = checkpoint_lib.reader(directory)
  finished = set(manager.all_steps())
  rows = []
  for path in manager.directory.iterdir():
    try:
      step = ocp.path.step.step_from_checkpoint_name(path.name)
    except ValueError:
      continue  # not a checkpoint
    row = {"step": step, "phase": "?", "bytes": _size(path), "complete": False, "path": str(path)}
    if step not in finished:
      row["note"] = "unfinished save (the process died while writing)"
    else:
      missing = [item for item in ("params", "opt_state", "meta") if not (path / item).is_dir()]
      try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        row["phase"] = meta["phase"]
        row["complete"] = not missing
        row["note"] = f"missing {missing}" if missing else ""
      except Exception as e:  # noqa: BLE001 - any unreadable metadata means "not usable"
        row["note"] = f"unreadable metadata: {type(e).__name__}"
    rows.append(row)
  manager.close()
  return sorted(rows, key=lambda r: r["step"])
