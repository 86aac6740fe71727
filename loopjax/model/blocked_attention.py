"""Exact causal attention with document masking in pure JAX, one block pair at a time (flash-style).

Why: the XLA path builds [B, N, S, S] scores and a [B, 1, S, S] mask, so its memory grows with S^2 and
a 32K or 64K sequence does not fit a chip (issue 10). Here query block i visits only key blocks j with
j * block_kv <= the block's last position (on or below the diagonal), keeping a running max, sum and
output (online softmax), and returns the output with the rows' logsumexp. The backward pass
(`jax.custom_vjp`) saves only the output and the blocked (q, k, v, segment ids, logsumexp) and
recomputes each block's probabilities from them, FlashAttention-2 style, in one pass over the block
pairs: each pair's probabilities and score gradients are computed once and give its share of dq, dk
and dv (dq summed over key blocks in a carried buffer), so no [S, S] array is saved or built. Softmax runs in at least
float32.

What keeps it fast on CPU (issue 11; `bench/bench_attention.py`, BENCHMARKS.md "Attention"):
  * heads-major blocks ([n, B, K, G, Q, H]), laid out once per call, so every block matmul is a plain
    batched matmul with no per-pair transposes;
  * q is scaled by 1/sqrt(H) once, not each block of scores;
  * the mask is an additive bias of [B, Q, C] (0 or MASKED) broadcast over heads, with no selects: a
    masked score becomes exactly MASKED, so exp(score - logsumexp) is exactly 0, and what a row
    accumulates while all its scores so far are masked (running max MASKED) is multiplied away by
    exp(MASKED - max) = 0 once it meets an allowed key; every row allows its own position (the
    diagonal block is always visited), so no row ends masked;
  * small blocks (64 on CPU, `attention.DEFAULT_BLOCK`): a block's [B, N, 64, 64] float32 scores are
    1 MiB at the peer shape and stay in cache, where 128 (4 MiB) made the backward 2x slower.

Shapes: B batch, S sequence, N query heads, K kv heads, G = N / K, H head dim, Q / C one query / key
block, n a block index.
"""

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

MASKED = -1e30  # finite and absorbing: score + MASKED == MASKED in float32 and float64


def _head_blocks(x_BSKGH, size: int):
  """[B, S, K, G, H] -> [S / size, B, K, G, size, H]: blocks first (for lax.map / indexing), heads-major."""
  B, S, K, G, H = x_BSKGH.shape
  return x_BSKGH.reshape(B, S // size, size, K, G, H).transpose(1, 0, 3, 4, 2, 5)


def _unblock(x_nBKGQH):
  """[n, B, K, G, Q, H] -> [B, n * Q, K, G, H]."""
  n, B, K, G, Q, H = x_nBKGQH.shape
  return x_nBKGQH.transpose(1, 0, 4, 2, 3, 5).reshape(B, n * Q, K, G, H)


def _seq_blocks(seg_BS, size: int):
  """[B, S] -> [S / size, B, size]."""
  B, S = seg_BS.shape
  return seg_BS.reshape(B, S // size, size).transpose(1, 0, 2)


def _kv_blocks_seen(i, bq: int, bk: int):
  """How many key blocks query block i visits: those holding a position <= its last query position."""
  return ((i + 1) * bq - 1) // bk + 1


def _scores(q_BKGQH, k_BKCH, seg_q_BQ, seg_k_BC, i, j, bq: int, bk: int):
  """Scores [B, K, G, Q, C] of (pre-scaled) query block i against key block j, plus the mask's bias:
  0 where attending is allowed (causal by position, same document; segment 0, padding, attends to
  itself), MASKED elsewhere."""
  acc = jnp.promote_types(q_BKGQH.dtype, jnp.float32)
  causal_QC = (i * bq + jnp.arange(bq))[:, None] >= (j * bk + jnp.arange(bk))[None, :]
  allowed_BQC = causal_QC & (seg_q_BQ[:, :, None] == seg_k_BC[:, None, :])
  bias_B11QC = jnp.where(allowed_BQC, 0, MASKED).astype(acc)[:, None, None]
  return jnp.einsum("bkgqh,bkch->bkgqc", q_BKGQH, k_BKCH, preferred_element_type=acc) + bias_B11QC


def _forward(q_BSNH, k_BSKH, v_BSKH, seg_BS, bq: int, bk: int):
  """(out_BSNH, residuals): online softmax over the visited key blocks of each query block."""
  B, S, N, H = q_BSNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  acc = jnp.promote_types(q_BSNH.dtype, jnp.float32)
  q_nBKGQH = _head_blocks((q_BSNH * jnp.asarray(H**-0.5, q_BSNH.dtype)).reshape(B, S, K, G, H), bq)
  k_nBKCH = _head_blocks(k_BSKH[:, :, :, None], bk)[:, :, :, 0]
  v_nBKCH = _head_blocks(v_BSKH[:, :, :, None], bk)[:, :, :, 0]
  segq_nBQ, segk_nBC = _seq_blocks(seg_BS, bq), _seq_blocks(seg_BS, bk)

  def one_query_block(args):
    i, q_BKGQH, segq_BQ = args

    def visit(j, carry):
      m_BKGQ, l_BKGQ, o_BKGQH = carry
      s_BKGQC = _scores(q_BKGQH, k_nBKCH[j], segq_BQ, segk_nBC[j], i, j, bq, bk)
      m_new = jnp.maximum(m_BKGQ, s_BKGQC.max(-1))
      p_BKGQC = jnp.exp(s_BKGQC - m_new[..., None])
      rescale = jnp.exp(m_BKGQ - m_new)
      o_BKGQH = o_BKGQH * rescale[..., None] + jnp.einsum(
          "bkgqc,bkch->bkgqh", p_BKGQC.astype(v_nBKCH.dtype), v_nBKCH[j], preferred_element_type=acc)
      return m_new, l_BKGQ * rescale + p_BKGQC.sum(-1), o_BKGQH

    init = (jnp.full((B, K, G, bq), MASKED, acc), jnp.zeros((B, K, G, bq), acc), jnp.zeros((B, K, G, bq, H), acc))
    m_BKGQ, l_BKGQ, o_BKGQH = jax.lax.fori_loop(0, _kv_blocks_seen(i, bq, bk), visit, init)
    return (o_BKGQH / l_BKGQ[..., None]).astype(q_BSNH.dtype), m_BKGQ + jnp.log(l_BKGQ)

  o_nBKGQH, lse_nBKGQ = jax.lax.map(one_query_block, (jnp.arange(S // bq), q_nBKGQH, segq_nBQ))
  # The output itself is the residual (one buffer with what the o-projection reads); both are named so
  # the remat policy "save_attention_core" can keep them instead of re-running these loops.
  out_BSNH = checkpoint_name(_unblock(o_nBKGQH).reshape(B, S, N, H), "attention_core")
  lse_nBKGQ = checkpoint_name(lse_nBKGQ, "attention_core")
  return out_BSNH, (q_nBKGQH, k_nBKCH, v_nBKCH, segq_nBQ, segk_nBC, out_BSNH, lse_nBKGQ)


def _backward(bq: int, bk: int, residuals, dout_BSNH):
  q_nBKGQH, k_nBKCH, v_nBKCH, segq_nBQ, segk_nBC, out_BSNH, lse_nBKGQ = residuals
  n_q, B, K, G, _, H = q_nBKGQH.shape
  S = n_q * bq
  acc = lse_nBKGQ.dtype
  do_nBKGQH = _head_blocks(dout_BSNH.reshape(B, S, K, G, H), bq)
  o_nBKGQH = _head_blocks(out_BSNH.reshape(B, S, K, G, H), bq)
  delta_nBKGQ = jnp.einsum("nbkgqh,nbkgqh->nbkgq", do_nBKGQH.astype(acc), o_nBKGQH.astype(acc))

  def visit_pair(i, j, grads):
    """Block pair (i, j): p and ds = p * (dp - delta) once, then their shares of dq_i, dk_j and dv_j."""
    dq_nBKGQH, dk_BKCH, dv_BKCH = grads
    q_BKGQH, k_BKCH, do_BKGQH = q_nBKGQH[i], k_nBKCH[j], do_nBKGQH[i]
    s_BKGQC = _scores(q_BKGQH, k_BKCH, segq_nBQ[i], segk_nBC[j], i, j, bq, bk)
    p_BKGQC = jnp.exp(s_BKGQC - lse_nBKGQ[i][..., None])
    dp_BKGQC = jnp.einsum("bkgqh,bkch->bkgqc", do_BKGQH, v_nBKCH[j], preferred_element_type=acc)
    ds_BKGQC = p_BKGQC * (dp_BKGQC - delta_nBKGQ[i][..., None])
    dq_nBKGQH = dq_nBKGQH.at[i].add(jnp.einsum("bkgqc,bkch->bkgqh", ds_BKGQC, k_BKCH.astype(acc)))
    dk_BKCH = dk_BKCH + jnp.einsum("bkgqc,bkgqh->bkch", ds_BKGQC, q_BKGQH.astype(acc))
    dv_BKCH = dv_BKCH + jnp.einsum("bkgqc,bkgqh->bkch", p_BKGQC, do_BKGQH.astype(acc))
    return dq_nBKGQH, dk_BKCH, dv_BKCH

  def key_block(j, carry):
    """Key block j against every query block that sees it; dq accumulates across key blocks."""
    dq_nBKGQH, dk_nBKCH, dv_nBKCH = carry
    zeros = jnp.zeros((B, K, bk, H), acc)
    dq_nBKGQH, dk_BKCH, dv_BKCH = jax.lax.fori_loop(
        (j * bk) // bq, n_q, lambda i, g: visit_pair(i, j, g), (dq_nBKGQH, zeros, zeros))
    return dq_nBKGQH, dk_nBKCH.at[j].set(dk_BKCH), dv_nBKCH.at[j].set(dv_BKCH)

  init = (jnp.zeros(q_nBKGQH.shape, acc), jnp.zeros(k_nBKCH.shape, acc), jnp.zeros(k_nBKCH.shape, acc))
  dq_nBKGQH, dk_nBKCH, dv_nBKCH = jax.lax.fori_loop(0, k_nBKCH.shape[0], key_block, init)
  # q entered the scores pre-scaled, so its gradient takes the scale once here.
  dq_BSNH = _unblock(dq_nBKGQH).reshape(B, S, K * G, H) * H**-0.5
  dk_BSKH = _unblock(dk_nBKCH[:, :, :, None]).reshape(B, S, K, H)
  dv_BSKH = _unblock(dv_nBKCH[:, :, :, None]).reshape(B, S, K, H)
  return (dq_BSNH.astype(q_nBKGQH.dtype), dk_BSKH.astype(k_nBKCH.dtype), dv_BSKH.astype(v_nBKCH.dtype), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q_BSNH, k_BSKH, v_BSKH, seg_BS, bq: int, bk: int):
  return _forward(q_BSNH, k_BSKH, v_BSKH, seg_BS, bq, bk)[0]


_attention.defvjp(lambda q, k, v, seg, bq, bk: _forward(q, k, v, seg, bq, bk), _backward)


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
