"""Attention kernels per device under `shard_map`, each device on its own query chunk.

Why: XLA does not partition a kernel call (Pallas, FFI), nor the blocked core's block loops, so under a
mesh they run through `shard_map`. Each device takes its shard of the batch rows and heads and its own
chunk of the queries (the activations' split along the sequence over the context axis), and
all-gathers the keys and values over the context axis inside; the all-gather's transpose then
reduce-scatters their gradients. A context group of c devices so splits the attention work c ways
instead of repeating it on every device (issue 30).

In the load-balanced order (`token_order`, `Mask.balanced` > 1) a device's queries are two pieces of the
natural sequence; the gathered keys, values and segment ids are put back into the natural order, so a
kernel needs only where each of its query pieces starts (`starts_P`, natural positions) to mask
causally. Outside a mesh the kernel gets everything at once (every piece of the order).
"""

import jax
import jax.numpy as jnp

from loopjax import sharding
from loopjax.model import token_order

ACTIVATIONS = ("batch", "seq", "act_heads", None)  # q, k, v and the output, as the layers lay them out


def run(local, q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, balanced: int, extra=(), extra_specs=()):
  """`local(q_BQNH, k_BSKH, v_BSKH, seg_BS, starts_P, *extra) -> out_BQNH` on each device's shard: its
  rows and heads, its Q query rows (in the order `balanced` says; 1 = natural), the keys, values and
  segment ids of the whole sequence in natural order, and the natural position where each of its P
  query pieces starts. `extra` are more arguments, laid out over the mesh by `extra_specs` (a kernel's
  own arrays: splash's mask, split along the queries like them)."""
  S = q_BSNH.shape[1]
  seg_BS = jnp.zeros(q_BSNH.shape[:2], jnp.int32) if segment_ids_BS is None else segment_ids_BS.astype(jnp.int32)
  axis, shards = sharding.mesh_axis("seq")
  if balanced not in (1, shards) and axis is not None:
    raise ValueError(f"the tokens are in the load-balanced order of {balanced} context shards, but the mesh "
                     f"splits the sequence {shards} ways")

  def shard(q_BQNH, k_BKH, v_BKH, seg_BS, *extra):
    """One device: q and (before the gather) k, v are its chunk of the order; seg_BS is the whole row."""
    if shards > 1:
      k_BKH, v_BKH = (jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in (k_BKH, v_BKH))
    k_BSKH, v_BSKH, seg_BS = (token_order.restore(x, balanced) for x in (k_BKH, v_BKH, seg_BS))
    rows = q_BQNH.shape[1]
    starts_P = token_order.piece_starts(S, balanced, rows, jax.lax.axis_index(axis) if shards > 1 else 0)
    return local(q_BQNH, k_BSKH, v_BSKH, seg_BS, starts_P, *extra)

  if jax.sharding.get_abstract_mesh().empty:
    return shard(q_BSNH, k_BSKH, v_BSKH, seg_BS, *extra)
  act = sharding.logical_to_spec(ACTIVATIONS)
  return jax.shard_map(shard, in_specs=(act, act, act, sharding.logical_to_spec(("batch", None)), *extra_specs),
                       out_specs=act, check_vma=False)(q_BSNH, k_BSKH, v_BSKH, seg_BS, *extra)


def query_segments(seg_BS, starts_P, rows: int):
  """[B, rows]: the segment ids of a device's query rows (its pieces, from the natural-order ids)."""
  length = rows // starts_P.shape[0]
  return jnp.take(seg_BS, (starts_P[:, None] + jnp.arange(length)).reshape(-1), axis=1)
