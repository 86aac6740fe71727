"""`loopjax upscale`: layer duplication from one Orbax checkpoint to another, one array at a time.

Restoring the model, upscaling and saving would hold input and output in memory together (2.9 GB +
5.3 GB for Ouro 1.4B -> 2.6B in bfloat16). This module works on the files instead, with tensorstore,
the library Orbax itself writes them with. loopjax checkpoints (see `loopjax.checkpoint`) hold each
array item (params, opt_state) as an OCDBT key-value store of zarr arrays named by the dotted tree
path ("stack.wq", "1.0.mu.stack.wq"), plus small JSON metadata files. For each array:

  not a layer array      its stored chunks are copied byte for byte (no decoding);
  layer array            read one stored chunk of layers at a time; each output layer drawn from it is
                         written as its own chunk (chunk shape [1, ...]);
  moments="reset"        every opt_state array is written as zeros (what `optimizer.init` gives), except
                         an LR schedule's count, which is copied (`optim.fresh_state_at`: a reset must not
                         send the LR back to its warmup). In the files that count is a scalar "P.count"
                         with no other array under "P." (optax's ScaleByScheduleState; Adam's count has
                         its mu and nu beside it).

So at most one stored input chunk (for an unsharded save, one whole [L, ...] array) plus the layers
in flight are in memory. The JSON metadata is copied with the changed shapes; the meta item gets the
new layer count and checksums. The checksum (a uint32 sum of bit patterns) is additive, so the new
one is the old one plus the duplicated layers' sums, computed from the layers as they stream past;
the first restore of the result verifies it end to end.

The output appears atomically: it is written under an Orbax-style temporary name and renamed once
complete, so a killed upscale leaves nothing that looks like a checkpoint. Either side may be on gs://
(tensorstore's gcs driver, epath for the JSON files). A bucket has no rename: there the step is written
in place and its commit_success.txt last, which is how Orbax itself marks a finished save on a bucket
(a killed upscale leaves a step without it, which Orbax and `loopjax checkpoints` call unfinished).
"""

import ast
import itertools
import json
import time

import numpy as np
import tensorstore as ts

from loopjax import storage, upscale
from loopjax.checkpoint.errors import CheckpointError
from loopjax.checkpoint.fingerprint import bits_sum
from loopjax.checkpoint.files import kvstore, open_array
from loopjax.checkpoint.layout import ARRAY_ITEMS
from loopjax.checkpoint.listing import pick_step
from loopjax.model import model_kind

_U32 = 2**32
_WRITES_IN_FLIGHT = 4


def _chunk_grid(shape, chunks):
  """The index regions (tuples of slices) of an array's stored chunks, in storage order."""
  return itertools.product(*[[slice(a, min(a + c, n)) for a in range(0, n, c)] for n, c in zip(shape, chunks)])


def _arrays(kv) -> dict[str, list[bytes]]:
  """Array name -> its stored keys (".zarray" and chunks)."""
  out = {}
  for key in kv.list().result():
    out.setdefault(key.decode().split("/")[0], []).append(key)
  return out


def _schedule_counts(names) -> set[str]:
  """The LR schedules' step counts among an opt_state's array names (see the module docstring)."""
  return {n for n in names if n.rpartition(".")[2] == "count"
          and not any(o != n and o.startswith(n.rpartition(".")[0] + ".") for o in names)}


class _ItemWriter:
  """Streams one array item (params or opt_state) from `src` to `dst`; returns its new checksum."""

  def __init__(self, src: str, dst: str, index: np.ndarray, stack_key: str, zero: bool):
    self.src, self.dst, self.index, self.stack_key, self.zero = src, dst, index, stack_key, zero
    self.context = ts.Context()
    self.kv_in = ts.KvStore.open(kvstore(src), context=self.context).result()
    self.kv_out = ts.KvStore.open(kvstore(dst), context=self.context).result()
    self.chunk_shapes = {}

  def run(self, old_checksum: int) -> int:
    delta = zeroed = 0  # new checksum - old checksum; with zeros, the new sums alone (mod 2**32)
    arrays = _arrays(self.kv_in)
    self.schedule_counts = _schedule_counts(arrays) if self.zero else set()
    for name, keys in sorted(arrays.items()):
      is_layers = upscale.is_layer_array(name.split("."), self.stack_key)
      if is_layers or self.zero:
        old_sum, new_sum = self._stream(name, is_layers)
        delta, zeroed = delta + new_sum - old_sum, zeroed + new_sum
      else:
        for key in keys:
          self.kv_out.write(key, self.kv_in.read(key).result().value).result()
    self._copy_metadata_files()
    return (zeroed if self.zero else old_checksum + delta) % _U32

  def _stream(self, name: str, is_layers: bool) -> tuple[int, int]:
    """Writes array `name` (layers re-indexed, or zeros); (old, new) checksum of what it streamed.

    Reads one stored chunk at a time (tensorstore decodes whole chunks anyway) and keeps at most
    `_WRITES_IN_FLIGHT` output layers of it pending, so memory stays near one chunk.
    """
    meta = json.loads(self.kv_in.read(f"{name}/.zarray").result().value)
    stored_chunks = meta["chunks"]
    source = open_array(self.src, name, self.context, read=True)
    dtype = source.dtype.numpy_dtype
    index = self.index if is_layers else np.arange(source.shape[0] if source.rank else 1)
    if is_layers:
      meta = dict(meta, shape=[len(index), *meta["shape"][1:]], chunks=[1, *meta["chunks"][1:]])
      self.chunk_shapes[name] = meta["chunks"]
    self.kv_out.write(f"{name}/.zarray", json.dumps(meta).encode()).result()
    target = open_array(self.dst, name, self.context, write=True)
    if source.rank == 0:  # a scalar (an optimizer step count): nothing to re-index
      old = source.read().result()
      value = old if not self.zero or name in self.schedule_counts else np.zeros((), dtype)
      target.write(value).result()
      return bits_sum(old), bits_sum(value)
    old_sum = new_sum = 0
    for region in _chunk_grid(source.shape, stored_chunks):
      if self.zero:  # the item's checksum is then 0: no sums needed
        rows, sums = np.zeros([r.stop - r.start for r in region], dtype), None
      else:
        rows = source[region].read().result()
        sums = [bits_sum(r) for r in rows]
        old_sum += sum(sums)
      first = region[0].start
      wanted = np.flatnonzero((index >= first) & (index < region[0].stop))
      for group in np.array_split(wanted, -(-len(wanted) // _WRITES_IN_FLIGHT) or 1):
        pending = [target[(int(j), *region[1:])].write(rows[index[j] - first]) for j in group]
        for write in pending:
          write.result()
      new_sum += 0 if sums is None else sum(sums[index[j] - first] for j in wanted)
      del rows
    return old_sum, new_sum

  def _copy_metadata_files(self):
    """Orbax's JSON files, with the write shapes of the layer arrays changed to their new chunks."""
    src, dst = storage.run_path(self.src), storage.run_path(self.dst)
    for rel in storage.files_under(src):
      parts = rel.split("/")
      if parts[0] == "d" or parts[0].startswith("ocdbt.process_") or parts[-1] == "manifest.ocdbt":
        continue  # OCDBT data and manifests: written by tensorstore above
      if parts[-1] == "_METADATA" or parts[0] == "array_metadatas":
        _write_text(dst / rel, json.dumps(self._with_new_write_shapes(json.loads((src / rel).read_text()))))
      else:
        storage.copy_file(src / rel, dst / rel)

  def _with_new_write_shapes(self, obj):
    if isinstance(obj, dict):
      name = obj.get("param_name")
      if name is None and "key_metadata" in obj:
        name = ".".join(str(k["key"]) for k in obj["key_metadata"])
      shape = self.chunk_shapes.get(name)
      out = {k: self._with_new_write_shapes(v) for k, v in obj.items()}
      for holder in (out, out.get("value_metadata")):
        if shape is not None and isinstance(holder, dict):
          for field in ("write_shape", "chunk_shape"):
            if field in holder:
              holder[field] = shape
      return out
    if isinstance(obj, list):
      return [self._with_new_write_shapes(v) for v in obj]
    return obj


def upscale_checkpoint(src_dir: str, dst_dir: str, *, layers: int, mapping="interleave",
                       moments: str = "duplicate", step: int | None = None) -> dict:
  """Writes step `step` (default: the newest complete one) of `src_dir`, upscaled, into `dst_dir`.

  Both are checkpoint directories (a run's WORKDIR/checkpoints). Returns a summary dict.
  """
  if moments not in upscale.MOMENTS:
    raise upscale.UpscaleError(f"moments={moments!r} is not one of {upscale.MOMENTS}")
  step = pick_step(src_dir, step, "--from")
  src = storage.run_path(src_dir) / str(step)
  final = storage.run_path(dst_dir) / str(step)
  if final.exists():
    raise CheckpointError(f"{final} exists. Fix: choose an empty --to directory")
  meta = json.loads((src / "meta" / "metadata").read_text())
  model = meta["config"]["model"]
  old_layers, stack_key = model["num_layers"], model_kind(model["kind"]).stack_key
  index = upscale.layer_index(old_layers, layers, mapping)
  remote = storage.is_remote(final)
  tmp = final if remote else final.parent / f"{step}.orbax-checkpoint-tmp-{time.time_ns()}"
  if not remote:
    tmp.mkdir(parents=True)
  checksums = dict(meta["checksums"])
  for item in sorted(p.name for p in src.iterdir()):
    if item in ARRAY_ITEMS:
      writer = _ItemWriter(str(src / item), str(tmp / item), index, stack_key,
                           zero=item == "opt_state" and moments == "reset")
      checksums[item] = writer.run(checksums[item])
    elif item not in ("meta", storage.COMMIT_FILE):
      storage.copy_tree(src / item, tmp / item) if (src / item).is_dir() else storage.copy_file(src / item, tmp / item)
  storage.copy_tree(src / "meta", tmp / "meta")
  meta["config"]["model"]["num_layers"] = layers
  for item_shapes in meta.get("shapes", {}).values():  # "(L, ...) dtype" per leaf, checked on restore
    for name, text in item_shapes.items():
      if upscale.is_layer_array(name.split("."), stack_key):
        shape, dtype = text.rsplit(" ", 1)
        item_shapes[name] = f"{(layers, *ast.literal_eval(shape)[1:])} {dtype}"
  meta.update(checksums=checksums, upscaled_from={"checkpoint": str(src), "layers": old_layers,
                                                  "index": index.tolist(), "moments": moments})
  (tmp / "meta" / "metadata").write_text(json.dumps(meta))
  (tmp / storage.COMMIT_FILE).write_text(f"Checkpoint commit was successful to {final}")  # last: see above
  if not remote:
    tmp.rename(final)
  return {"step": step, "from_layers": old_layers, "to_layers": layers, "path": str(final)}


def _write_text(path, text: str):
  if not storage.is_remote(path):
    path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
