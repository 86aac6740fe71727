"""A saved checkpoint's array files opened directly, for tools that stream one array at a time
(upscale, export-hf) instead of restoring a whole pytree.

Orbax writes each array item (params, opt_state) of step N as `<dir>/N/<item>`: an OCDBT key-value
store of zarr arrays named by their dotted tree path ("stack.wq", "1.0.mu.stack.wq"), plus small JSON
metadata files. Orbax's public API restores whole items; reading or writing one array, or copying a
stored chunk byte for byte, needs the store itself. Tensorstore is the library Orbax writes it with,
so reading a chunk here costs what a restore would. Directories are local or gs:// (`loopjax.storage`):
tensorstore reads a bucket through its gcs driver.
"""

import tensorstore as ts

from loopjax import storage


def kvstore(item_dir: str) -> dict:
  """The tensorstore spec of one item's key-value store."""
  return {"driver": "ocdbt", "base": storage.kvstore_url(item_dir)}


def open_array(item_dir: str, name: str, context: ts.Context | None = None, **mode) -> ts.TensorStore:
  """The stored array `name` of an item (mode: read=True or write=True)."""
  spec = {"driver": "zarr", "kvstore": dict(kvstore(item_dir), path=name)}
  return ts.open(spec, context=context or ts.Context(), **(mode or {"read": True})).result()
