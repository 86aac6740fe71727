"""Exact causal attention with document masking in pure JAX, one block pair at a time (flash-style).

Why: the XLA path builds [B, N, S, S] scores and a [B, 1, S, S] mask, so its memory grows with S^2 and
a 32K or 64K sequence does not fit a chip (issue 10). Here query block i visits only key blocks j with
j * block_kv <= the block's last position (on or below the diagonal), keeping a running max, sum and
output (online softmax), and returns the output with the rows' logsumexp. The backward pass
(`jax.custom_vjp`) saves only (q, k, v, segment ids, out, logsumexp) and recomputes each block's
probabilities from them, FlashAttention-2 style, in one pass over the block pairs: each pair's
probabilities and score gradients are computed once and give its share of dq, dk and dv (dq summed
over key blocks in a carried buffer), so no [S, S] array is saved or built. Softmax runs in at least
float32.

Shapes: B batch, S sequence, N query heads, K kv heads, G = N / K, H head dim, Q / C one query / key
block, n a block index.
"""

import functools

import jax
import jax.numpy as jnp

MASKED = -1e30  # finite, so a block that masks a whole row gives exp(0) * 0 terms, never NaN


def _blocks(x, size: int):
  """[B, S, ...] -> [S / size, B, size, ...] (blocks first, for lax.map and dynamic indexing)."""
  B, S = x.shape[:2]
  return jnp.moveaxis(x.reshape(B, S // size, size, *x.shape[2:]), 1, 0)


def _unblocks(x):
  """[n, B, size, ...] -> [B, n * size, ...]."""
  n, B, size = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(B, n * size, *x.shape[3:])


def _kv_blocks_seen(i, bq: int, bk: int):
  """How many key blocks query block i visits: those holding a position <= its last query position."""
  return ((i + 1) * bq - 1) // bk + 1


def _scores(q_BQKGH, k_BCKH, seg_q_BQ, seg_k_BC, i, j, bq: int, bk: int):
  """Scaled scores [B, K, G, Q, C] of query block i against key block j, and where attending is allowed
  (causal by sequence index and within one document; segment 0, padding, attends to itself)."""
  acc = jnp.promote_types(q_BQKGH.dtype, jnp.float32)
  s_BKGQC = jnp.einsum("bqkgh,bckh->bkgqc", q_BQKGH, k_BCKH, preferred_element_type=acc)
  s_BKGQC = s_BKGQC * q_BQKGH.shape[-1] ** -0.5
  causal_QC = (i * bq + jnp.arange(bq))[:, None] >= (j * bk + jnp.arange(bk))[None, :]
  allowed_BQC = causal_QC & (seg_q_BQ[:, :, None] == seg_k_BC[:, None, :])
  return s_BKGQC, allowed_BQC[:, None, None]


def _forward(q_BSNH, k_BSKH, v_BSKH, seg_BS, bq: int, bk: int):
  """(out_BSNH, lse_BKGS): online softmax over the visited key blocks of each query block."""
  B, S, N, H = q_BSNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  acc = jnp.promote_types(q_BSNH.dtype, jnp.float32)
  q_nBQKGH = _blocks(q_BSNH.reshape(B, S, K, G, H), bq)
  k_nBCKH, v_nBCKH, segk_nBC = _blocks(k_BSKH, bk), _blocks(v_BSKH, bk), _blocks(seg_BS, bk)

  def one_query_block(args):
    i, q_BQKGH, segq_BQ = args

    def visit(j, carry):
      m_BKGQ, l_BKGQ, o_BKGQH = carry
      s_BKGQC, allowed = _scores(q_BQKGH, k_nBCKH[j], segq_BQ, segk_nBC[j], i, j, bq, bk)
      s_BKGQC = jnp.where(allowed, s_BKGQC, MASKED)
      m_new = jnp.maximum(m_BKGQ, s_BKGQC.max(-1))
      p_BKGQC = jnp.where(allowed, jnp.exp(s_BKGQC - m_new[..., None]), 0)
      rescale = jnp.exp(m_BKGQ - m_new)
      o_BKGQH = o_BKGQH * rescale[..., None] + jnp.einsum(
          "bkgqc,bckh->bkgqh", p_BKGQC.astype(v_nBCKH.dtype), v_nBCKH[j], preferred_element_type=acc)
      return m_new, l_BKGQ * rescale + p_BKGQC.sum(-1), o_BKGQH

    init = (jnp.full((B, K, G, bq), MASKED, acc), jnp.zeros((B, K, G, bq), acc), jnp.zeros((B, K, G, bq, H), acc))
    m_BKGQ, l_BKGQ, o_BKGQH = jax.lax.fori_loop(0, _kv_blocks_seen(i, bq, bk), visit, init)
    return o_BKGQH / l_BKGQ[..., None], m_BKGQ + jnp.log(l_BKGQ)

  o_nBKGQH, lse_nBKGQ = jax.lax.map(one_query_block, (jnp.arange(S // bq), q_nBQKGH, _blocks(seg_BS, bq)))
  out_BSNH = _unblocks(jnp.moveaxis(o_nBKGQH, 4, 2)).reshape(B, S, N, H).astype(q_BSNH.dtype)
  lse_BKGS = jnp.moveaxis(lse_nBKGQ, 0, 3).reshape(B, K, G, S)
  return out_BSNH, lse_BKGS


def _grad_terms(q_BQKGH, k_BCKH, v_BCKH, do_BQKGH, lse_BKGQ, delta_BKGQ, seg_q_BQ, seg_k_BC, i, j, bq, bk):
  """Recomputed probabilities p and score gradients ds = p * (dp - delta) of one block pair."""
  acc = lse_BKGQ.dtype
  s_BKGQC, allowed = _scores(q_BQKGH, k_BCKH, seg_q_BQ, seg_k_BC, i, j, bq, bk)
  p_BKGQC = jnp.where(allowed, jnp.exp(jnp.where(allowed, s_BKGQC, MASKED) - lse_BKGQ[..., None]), 0)
  dp_BKGQC = jnp.einsum("bqkgh,bckh->bkgqc", do_BQKGH, v_BCKH, preferred_element_type=acc)
  return p_BKGQC, p_BKGQC * (dp_BKGQC - delta_BKGQ[..., None])


def _backward(bq: int, bk: int, residuals, dout_BSNH):
  q_BSNH, k_BSKH, v_BSKH, seg_BS, out_BSNH, lse_BKGS = residuals
  B, S, N, H = q_BSNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  acc, scale = lse_BKGS.dtype, H**-0.5
  delta_BKGS = jnp.einsum("bsnh,bsnh->bsn", dout_BSNH.astype(acc), out_BSNH.astype(acc))
  delta_BKGS = jnp.moveaxis(delta_BKGS.reshape(B, S, K, G), 1, 3)
  q_nBQKGH = _blocks(q_BSNH.reshape(B, S, K, G, H), bq)
  do_nBQKGH = _blocks(dout_BSNH.reshape(B, S, K, G, H), bq)
  row_blocks = lambda x_BKGS: jnp.moveaxis(x_BKGS.reshape(B, K, G, S // bq, bq), 3, 0)
  lse_nBKGQ, delta_nBKGQ, segq_nBQ = row_blocks(lse_BKGS), row_blocks(delta_BKGS), _blocks(seg_BS, bq)
  k_nBCKH, v_nBCKH, segk_nBC = _blocks(k_BSKH, bk), _blocks(v_BSKH, bk), _blocks(seg_BS, bk)

  def visit_pair(i, j, grads):
    """Block pair (i, j): p and ds once, then their contributions to dq_i, dk_j and dv_j."""
    dq_nBQKGH, dk_BCKH, dv_BCKH = grads
    p_BKGQC, ds_BKGQC = _grad_terms(q_nBQKGH[i], k_nBCKH[j], v_nBCKH[j], do_nBQKGH[i], lse_nBKGQ[i],
                                    delta_nBKGQ[i], segq_nBQ[i], segk_nBC[j], i, j, bq, bk)
    dq_BQKGH = jnp.einsum("bkgqc,bckh->bqkgh", ds_BKGQC, k_nBCKH[j].astype(acc)) * scale
    dk_BCKH = dk_BCKH + jnp.einsum("bkgqc,bqkgh->bckh", ds_BKGQC, q_nBQKGH[i].astype(acc)) * scale
    dv_BCKH = dv_BCKH + jnp.einsum("bkgqc,bqkgh->bckh", p_BKGQC, do_nBQKGH[i].astype(acc))
    return dq_nBQKGH.at[i].add(dq_BQKGH), dk_BCKH, dv_BCKH

  def key_block(j, carry):
    """Key block j against every query block that sees it; dq accumulates across key blocks."""
    dq_nBQKGH, dk_nBCKH, dv_nBCKH = carry
    zeros = jnp.zeros((B, bk, K, H), acc)
    dq_nBQKGH, dk_BCKH, dv_BCKH = jax.lax.fori_loop(
        (j * bk) // bq, S // bq, lambda i, g: visit_pair(i, j, g), (dq_nBQKGH, zeros, zeros))
    return dq_nBQKGH, dk_nBCKH.at[j].set(dk_BCKH), dv_nBCKH.at[j].set(dv_BCKH)

  n_q, n_k = S // bq, S // bk
  init = (jnp.zeros((n_q, B, bq, K, G, H), acc), jnp.zeros((n_k, B, bk, K, H), acc),
          jnp.zeros((n_k, B, bk, K, H), acc))
  dq_nBQKGH, dk_nBCKH, dv_nBCKH = jax.lax.fori_loop(0, n_k, key_block, init)
  dq_BSNH = _unblocks(dq_nBQKGH).reshape(B, S, N, H)
  return (dq_BSNH.astype(q_BSNH.dtype), _unblocks(dk_nBCKH).astype(k_BSKH.dtype),
          _unblocks(dv_nBCKH).astype(v_BSKH.dtype), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q_BSNH, k_BSKH, v_BSKH, seg_BS, bq: int, bk: int):
  return _forward(q_BSNH, k_BSKH, v_BSKH, seg_BS, bq, bk)[0]


def _attention_fwd(q_BSNH, k_BSKH, v_BSKH, seg_BS, bq, bk):
  out_BSNH, lse_BKGS = _forward(q_BSNH, k_BSKH, v_BSKH, seg_BS, bq, bk)
  return out_BSNH, (q_BSNH, k_BSKH, v_BSKH, seg_BS, out_BSNH, lse_BKGS)


_attention.defvjp(_attention_fwd, _backward)


def blocked_attention(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, block_q: int, block_kv: int) -> jax.Array:
  """softmax(q k^T / sqrt(H)) v, causal and within documents (None: one document per row).

  Blocks larger than S shrink to S; S must be a multiple of both (config.validate checks it).
  """
  B, S = q_BSNH.shape[:2]
  bq, bk = min(block_q, S), min(block_kv, S)
  if S % bq or S % bk:
    raise ValueError(f"blocked attention: sequence {S} is not a multiple of blocks ({bq}, {bk})")
  seg_BS = jnp.zeros((B, S), jnp.int32) if segment_ids_BS is None else segment_ids_BS.astype(jnp.int32)
  return _attention(q_BSNH, k_BSKH, v_BSKH, seg_BS, bq, bk)
