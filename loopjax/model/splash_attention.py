"""Pallas splash attention (TPU) per device, with its queries split over the context axis.

Splash takes a mask object and works out ahead of time, per block of queries and keys, whether the block
is empty, full or partial (`MaskInfo`). With `q_seq_shards` = c it cuts that information into c query
chunks, and the kernel object (a pytree of those arrays) becomes an argument of the `shard_map`, laid out
by its own `manual_sharding_spec`: each device then runs the kernel on its own S / c queries against the
whole keys (`per_shard.run` gathers them), and the group splits the work instead of repeating it.

The causal mask reads each query row's position from the mask's `q_sequence` and each key's from its
index. The load-balanced order (`token_order`) therefore needs only q_sequence set to the order's
natural positions, the keys coming back in natural order; with blocks inside one chunk, every block is
still empty, full or diagonal, so the kernel skips as much as in the natural order.
"""


import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import NamedSharding, PartitionSpec as P

from loopjax import sharding
from loopjax.model import per_shard, token_order


class OrderedCausalMask(masks.CausalMask):
  """Causal in natural positions for query rows in another order: row i sits at position positions_S[i]."""

  def __init__(self, positions_S):
    super().__init__((len(positions_S), len(positions_S)))
    self.q_sequence = positions_S


def make_kernel(heads: int, seq: int, balanced: int, q_shards: int, bq: int, bk: int, mqa: bool, interpret: bool):
  """A causal splash kernel over `heads` query heads whose S queries, in the order `balanced` says, are split
  into `q_shards` chunks (segment ids come with each call)."""
  sizes = kernels.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                             block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  mask = masks.MultiHeadMask([OrderedCausalMask(token_order.positions(seq, balanced))] * heads)
  make = kernels.make_splash_mqa if mqa else kernels.make_splash_mha
  return make(mask, block_sizes=sizes, head_shards=1, q_seq_shards=q_shards, interpret=interpret)


def _local(q_BQNH, k_BSKH, v_BSKH, seg_BS, starts_P, kernel):
  """Splash on one device's shard: per row, [N, Q, H] heads-major (MHA) or per kv head (GQA, MQA kernel)."""
  B, Q, N, H = q_BQNH.shape
  S, K = k_BSKH.shape[1:3]
  G = N // K
  q_BNQH = jnp.swapaxes(q_BQNH * jnp.asarray(H**-0.5, q_BQNH.dtype), 1, 2)  # splash applies no scale
  k_BKSH, v_BKSH = jnp.swapaxes(k_BSKH, 1, 2), jnp.swapaxes(v_BSKH, 1, 2)

  def row(q_NQH, k_KSH, v_KSH, segq_Q, seg_S):
    ids = kernels.SegmentIds(q=segq_Q, kv=seg_S)
    if G == 1:
      return kernel(q_NQH, k_KSH, v_KSH, ids)
    per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    return per_kv_head(q_NQH.reshape(K, G, Q, H), k_KSH, v_KSH, ids).reshape(N, Q, H)

  segq_BQ = per_shard.query_segments(seg_BS, starts_P, Q)
  return jnp.swapaxes(jax.vmap(row)(q_BNQH, k_BKSH, v_BKSH, segq_BQ, seg_BS), 1, 2)


def splash(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, balanced: int, bq: int, bk: int, interpret: bool = False):
  """Splash attention per device (`per_shard.run`), each on its S / context queries (`q_seq_shards`)."""
  S, N, _ = q_BSNH.shape[1:]
  G = N // k_BSKH.shape[2]
  seq_axis, q_shards = sharding.mesh_axis("seq")
  heads = (N // sharding.mesh_axis("act_heads")[1]) if G == 1 else G
  kernel = make_kernel(heads, S, balanced, q_shards, bq, bk, G > 1, interpret)
  mesh = jax.sharding.get_abstract_mesh()
  specs = () if mesh.empty else (kernel.manual_sharding_spec(NamedSharding(mesh, P(None, seq_axis))),)
  return per_shard.run(_local, q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, balanced, (kernel,), specs)
