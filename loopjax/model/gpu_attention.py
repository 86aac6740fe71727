"""Fused flash attention for GPU training with documents: JAX's Pallas GPU kernel (Triton), per device.

Why (issue 30): training rows always carry segment ids, and cuDNN through `jax.nn.dot_product_attention`
takes none (only a dense O(S^2) mask), so GPU training ran the pure-JAX blocked core. The Pallas kernel
`jax.experimental.pallas.ops.gpu.attention.mha` takes segment ids and is causal, with a fused forward
(online softmax over key blocks) and a Triton backward (dk/dv per key block, dq per query block).

Its limits decide where `attention.resolve` picks it: one segment-id array serves queries and keys and
the causal mask aligns query i with key i, so it runs whole sequences only (no query chunk against
gathered keys: under context parallelism `auto` takes blocked, which splits the work); its heads are
query heads, so grouped-query keys and values are repeated per query head here (their gradients sum
back through the repeat); sequences tile by 128 (forward) and 32 (backward) rows. GPU-only: on CPU it
runs in Pallas interpret mode (the tests).
"""

import functools

import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu_attention

from loopjax.model import per_shard

TILE = 128  # the kernel's default forward blocks; its backward blocks (32) divide them


def _local(q_BSNH, k_BSKH, v_BSKH, seg_BS, starts_P, interpret: bool):
  if q_BSNH.shape[1] != k_BSKH.shape[1]:
    raise ValueError("pallas_gpu attention runs whole sequences only (its causal mask has no query offset)")
  del starts_P  # [0]: the whole sequence
  G = q_BSNH.shape[2] // k_BSKH.shape[2]
  k_BSNH, v_BSNH = (jnp.repeat(x, G, axis=2) for x in (k_BSKH, v_BSKH))
  return pallas_gpu_attention.mha(q_BSNH, k_BSNH, v_BSNH, seg_BS, sm_scale=q_BSNH.shape[-1] ** -0.5, causal=True,
                                  interpret=interpret)


def pallas_gpu(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, interpret: bool = False):
  """The Pallas GPU flash kernel per device (batch and heads split, each sequence whole)."""
  return per_shard.run(functools.partial(_local, interpret=interpret), q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, 1)
