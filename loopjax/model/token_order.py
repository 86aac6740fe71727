"""The load-balanced token order of context parallelism.

Why: under causal attention, query position p attends to p + 1 keys. When a context group of c devices
splits the sequence into c contiguous chunks, device i has 2i + 1 times device 0's attention work, and
the group waits for the last one (2c - 1 times the first). Cut the sequence into 2c chunks instead and
give device i chunks i and 2c - 1 - i (the order MaxText's context parallelism uses): each device gets
one early and one late chunk, the same work to within one chunk's diagonal.

The training step runs the whole model in this order (`LoopedModel.step_losses`): everything but
attention works per token, RoPE reads each token's position from the (reordered) positions input, and
attention masks by each token's natural position (`attention.Mask.balanced`). The inputs are whole rows
on every device of a context group, so reordering them moves no data; the per-token losses go back to
the natural order at the end (T x B x S numbers).

`shards` = 1 is the natural order. Within the order, a device's rows are contiguous pieces of the
natural sequence; `piece_starts` says where they start, which is all a kernel that gets the keys in
natural order needs to mask causally.
"""

import jax
import jax.numpy as jnp
import numpy as np

from loopjax import sharding


def chunk_order(shards: int) -> np.ndarray:
  """[2 * shards]: the natural chunk at each slot of the balanced order, e.g. 2 -> [0, 3, 1, 2]."""
  i = np.arange(shards)
  return np.stack([i, 2 * shards - 1 - i], axis=1).reshape(-1)


def chunk_length(seq_len: int, shards: int) -> int:
  """Positions per chunk: seq_len / (2 shards) (ValueError if that is not whole); the natural order is one chunk."""
  if shards == 1:
    return seq_len
  if seq_len % (2 * shards):
    raise ValueError(f"the load-balanced order over {shards} context shards needs a sequence divisible by "
                     f"{2 * shards}, got {seq_len}")
  return seq_len // (2 * shards)


def positions(seq_len: int, shards: int) -> np.ndarray:
  """[S] int32: the natural position of each slot of the balanced order."""
  chunk = chunk_length(seq_len, shards)
  order = chunk_order(shards) if shards > 1 else np.zeros(1, int)
  return (order[:, None] * chunk + np.arange(chunk)).reshape(-1).astype(np.int32)


def _reorder(x: jax.Array, order: np.ndarray, axis: int) -> jax.Array:
  """x's chunks along `axis` in `order`: static slices, concatenated (cheaper than a gather on CPU)."""
  length = x.shape[axis] // len(order)
  return jnp.concatenate([jax.lax.slice_in_dim(x, i * length, (i + 1) * length, axis=axis) for i in order], axis)


def balance(x: jax.Array | None, shards: int, axis: int = 1) -> jax.Array | None:
  """x (natural order along `axis`) in the balanced order; None stays None."""
  if x is None or shards == 1:
    return x
  chunk_length(x.shape[axis], shards)
  return _reorder(x, chunk_order(shards), axis)


def restore(x: jax.Array | None, shards: int, axis: int = 1) -> jax.Array | None:
  """The inverse of `balance`: x (balanced order along `axis`) in the natural order."""
  if x is None or shards == 1:
    return x
  chunk_length(x.shape[axis], shards)
  return _reorder(x, np.argsort(chunk_order(shards)), axis)


def context_shards() -> int:
  """The size of the context group the sequence is split over in the current mesh (1 outside a mesh)."""
  return sharding.mesh_axis("seq")[1]


def pieces(seq_len: int, shards: int, rows: int) -> tuple[int, int]:
  """(pieces, piece length) of `rows` consecutive slots of the order, each piece contiguous in the natural
  sequence: a device of a context group of `shards` has two; one device holding everything has 2 shards."""
  chunk = chunk_length(seq_len, shards)
  if rows % chunk and chunk % rows:
    raise ValueError(f"{rows} rows of a sequence of {seq_len} do not split into chunks of {chunk}")
  count = max(rows // chunk, 1)
  return count, rows // count


def piece_starts(seq_len: int, shards: int, rows: int, index) -> jax.Array:
  """[pieces] int32: the natural position where each piece of slots [index * rows, (index + 1) * rows) of
  the order starts (`index` may be traced: a device's index along the context axis)."""
  count, length = pieces(seq_len, shards, rows)
  chunk = chunk_length(seq_len, shards)
  order = jnp.asarray(chunk_order(shards) if shards > 1 else np.zeros(1, int), jnp.int32)
  slots = index * rows + jnp.arange(count, dtype=jnp.int32) * length
  return order[slots // chunk] * chunk + slots % chunk
