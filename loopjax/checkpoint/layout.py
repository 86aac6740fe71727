"""A loopjax checkpoint's items and the Orbax handlers that write and read them.

Step N is the directory `<dir>/N` with one Orbax item per part:
  params, opt_state  pytrees of (sharded) arrays: PyTreeSave / PyTreeRestore;
  meta               JSON: step, phase, the resolved config, loop counters, a checksum and the leaf
                     shapes per array item, and the data iterator's state.

Arrays are stored uncompressed unless asked: Orbax's zstd shrinks float training state by only 8-20%
but is much of an async save's CPU work, which competes with the train step for the host's cores
(BENCHMARKS.md). Either kind restores with any setting: the codec is read from each array's metadata.
"""

import orbax.checkpoint as ocp

ARRAY_ITEMS = ("params", "opt_state")


def handlers(compress: bool = False) -> dict:
  """Item name -> its Orbax handler (zstd on the arrays only when `compress`)."""
  out = {name: ocp.PyTreeCheckpointHandler(use_compression=compress) for name in ARRAY_ITEMS}
  out["meta"] = ocp.JsonCheckpointHandler()
  return out


def restore_args(target) -> ocp.args.PyTreeRestore:
  """Restores the pytree `target` describes: ShapeDtypeStructs with shardings, or numpy arrays (host)."""
  return ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def meta_only() -> ocp.args.Composite:
  """Restore args that read just the meta item (no arrays)."""
  return ocp.args.Composite(meta=ocp.args.JsonRestore())
