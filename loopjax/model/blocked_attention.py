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

The queries may be a part of the keys' sequence (context parallelism: one device's query chunk against
the gathered keys): P equal pieces, each contiguous in the sequence, piece p starting at position
starts_P[p]. A query block then knows its position, which is all the causal mask and the choice of key
blocks need.

Shapes: B batch, S key sequence, Sq query rows, N query heads, K kv heads, G = N / K, H head dim, Q / C
one query / key block, n a block index.
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


def _block_positions(starts_P, rows: int, bq: int):
  """[rows / bq]: the position of each query block's first row (blocks never straddle a piece)."""
  per_piece = rows // starts_P.shape[0] // bq
  return (starts_P[:, None] + bq * jnp.arange(per_piece, dtype=starts_P.dtype)[None]).reshape(-1)


def _kv_blocks_seen(pos, bq: int, bk: int):
  """How many key blocks the query block at position pos visits: those holding a position <= its last."""
  return (pos + bq - 1) // bk + 1


def _scores(q_BKGQH, k_BKCH, seg_q_BQ, seg_k_BC, pos, j, bq: int, bk: int):
  """Scores [B, K, G, Q, C] of the (pre-scaled) query block at position pos against key block j, plus the
  mask's bias: 0 where attending is allowed (causal by position, same document; segment 0, padding,
  attends to itself), MASKED elsewhere."""
  acc = jnp.promote_types(q_BKGQH.dtype, jnp.float32)
  causal_QC = (pos + jnp.arange(bq))[:, None] >= (j * bk + jnp.arange(bk))[None, :]
  allowed_BQC = causal_QC & (seg_q_BQ[:, :, None] == seg_k_BC[:, None, :])
  bias_B11QC = jnp.where(allowed_BQC, 0, MASKED).astype(acc)[:, None, None]
  return jnp.einsum("bkgqh,bkch->bkgqc", q_BKGQH, k_BKCH, preferred_element_type=acc) + bias_B11QC


def _forward(q_BQNH, k_BSKH, v_BSKH, seg_BS, starts_P, bq: int, bk: int):
  """(out_BQNH, residuals): online softmax over the visited key blocks of each query block."""
  B, Sq, N, H = q_BQNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  acc = jnp.promote_types(q_BQNH.dtype, jnp.float32)
  q_nBKGQH = _head_blocks((q_BQNH * jnp.asarray(H**-0.5, q_BQNH.dtype)).reshape(B, Sq, K, G, H), bq)
  k_nBKCH = _head_blocks(k_BSKH[:, :, :, None], bk)[:, :, :, 0]
  v_nBKCH = _head_blocks(v_BSKH[:, :, :, None], bk)[:, :, :, 0]
  pos_n = _block_positions(starts_P, Sq, bq)
  segq_nBQ = jnp.take(seg_BS, pos_n[:, None] + jnp.arange(bq), axis=1).transpose(1, 0, 2)
  segk_nBC = _seq_blocks(seg_BS, bk)

  def one_query_block(args):
    pos, q_BKGQH, segq_BQ = args

    def visit(j, carry):
      m_BKGQ, l_BKGQ, o_BKGQH = carry
      s_BKGQC = _scores(q_BKGQH, k_nBKCH[j], segq_BQ, segk_nBC[j], pos, j, bq, bk)
      m_new = jnp.maximum(m_BKGQ, s_BKGQC.max(-1))
      p_BKGQC = jnp.exp(s_BKGQC - m_new[..., None])
      rescale = jnp.exp(m_BKGQ - m_new)
      o_BKGQH = o_BKGQH * rescale[..., None] + jnp.einsum(
          "bkgqc,bkch->bkgqh", p_BKGQC.astype(v_nBKCH.dtype), v_nBKCH[j], preferred_element_type=acc)
      return m_new, l_BKGQ * rescale + p_BKGQC.sum(-1), o_BKGQH

    init = (jnp.full((B, K, G, bq), MASKED, acc), jnp.zeros((B, K, G, bq), acc), jnp.zeros((B, K, G, bq, H), acc))
    m_BKGQ, l_BKGQ, o_BKGQH = jax.lax.fori_loop(0, _kv_blocks_seen(pos, bq, bk), visit, init)
    return (o_BKGQH / l_BKGQ[..., None]).astype(q_BQNH.dtype), m_BKGQ + jnp.log(l_BKGQ)

  o_nBKGQH, lse_nBKGQ = jax.lax.map(one_query_block, (pos_n, q_nBKGQH, segq_nBQ))
  # The output itself is the residual (one buffer with what the o-projection reads); both are named so
  # the remat policy "save_attention_core" can keep them instead of re-running these loops.
  out_BQNH = checkpoint_name(_unblock(o_nBKGQH).reshape(B, Sq, N, H), "attention_core")
  lse_nBKGQ = checkpoint_name(lse_nBKGQ, "attention_core")
  return out_BQNH, (q_nBKGQH, k_nBKCH, v_nBKCH, segq_nBQ, segk_nBC, starts_P, out_BQNH, lse_nBKGQ)


def _backward(bq: int, bk: int, residuals, dout_BQNH):
  q_nBKGQH, k_nBKCH, v_nBKCH, segq_nBQ, segk_nBC, starts_P, out_BQNH, lse_nBKGQ = residuals
  n_q, B, K, G, _, H = q_nBKGQH.shape
  Sq, S = n_q * bq, k_nBKCH.shape[0] * bk
  acc = lse_nBKGQ.dtype
  do_nBKGQH = _head_blocks(dout_BQNH.reshape(B, Sq, K, G, H), bq)
  o_nBKGQH = _head_blocks(out_BQNH.reshape(B, Sq, K, G, H), bq)
  delta_nBKGQ = jnp.einsum("nbkgqh,nbkgqh->nbkgq", do_nBKGQH.astype(acc), o_nBKGQH.astype(acc))
  pos_n = _block_positions(starts_P, Sq, bq)
  per_piece = n_q // starts_P.shape[0]

  def visit_pair(i, j, grads):
    """Block pair (i, j): p and ds = p * (dp - delta) once, then their shares of dq_i, dk_j and dv_j."""
    dq_nBKGQH, dk_BKCH, dv_BKCH = grads
    q_BKGQH, k_BKCH, do_BKGQH = q_nBKGQH[i], k_nBKCH[j], do_nBKGQH[i]
    s_BKGQC = _scores(q_BKGQH, k_BKCH, segq_nBQ[i], segk_nBC[j], pos_n[i], j, bq, bk)
    p_BKGQC = jnp.exp(s_BKGQC - lse_nBKGQ[i][..., None])
    dp_BKGQC = jnp.einsum("bkgqh,bkch->bkgqc", do_BKGQH, v_nBKCH[j], preferred_element_type=acc)
    ds_BKGQC = p_BKGQC * (dp_BKGQC - delta_nBKGQ[i][..., None])
    dq_nBKGQH = dq_nBKGQH.at[i].add(jnp.einsum("bkgqc,bkch->bkgqh", ds_BKGQC, k_BKCH.astype(acc)))
    dk_BKCH = dk_BKCH + jnp.einsum("bkgqc,bkgqh->bkch", ds_BKGQC, q_BKGQH.astype(acc))
    dv_BKCH = dv_BKCH + jnp.einsum("bkgqc,bkgqh->bkch", p_BKGQC, do_BKGQH.astype(acc))
    return dq_nBKGQH, dk_BKCH, dv_BKCH

  def key_block(j, carry):
    """Key block j against every query block that sees it (in each piece, those from the one holding
    position j * bk on); dq accumulates across key blocks."""
    dq_nBKGQH, dk_nBKCH, dv_nBKCH = carry
    grads = (dq_nBKGQH, jnp.zeros((B, K, bk, H), acc), jnp.zeros((B, K, bk, H), acc))
    for piece in range(starts_P.shape[0]):
      first = jnp.clip((j * bk - starts_P[piece]) // bq, 0, per_piece)
      grads = jax.lax.fori_loop(piece * per_piece + first, (piece + 1) * per_piece,
                                lambda i, g: visit_pair(i, j, g), grads)
    dq_nBKGQH, dk_BKCH, dv_BKCH = grads
    return dq_nBKGQH, dk_nBKCH.at[j].set(dk_BKCH), dv_nBKCH.at[j].set(dv_BKCH)

  init = (jnp.zeros(q_nBKGQH.shape, acc), jnp.zeros(k_nBKCH.shape, acc), jnp.zeros(k_nBKCH.shape, acc))
  # Key blocks past every query's diagonal get no gradient; the loop stops at the last one seen.
  seen = jnp.minimum(_kv_blocks_seen(jnp.max(pos_n), bq, bk), k_nBKCH.shape[0])
  dq_nBKGQH, dk_nBKCH, dv_nBKCH = jax.lax.fori_loop(0, seen, key_block, init)
  # q entered the scores pre-scaled, so its gradient takes the scale once here.
  dq_BQNH = _unblock(dq_nBKGQH).reshape(B, Sq, K * G, H) * H**-0.5
  dk_BSKH = _unblock(dk_nBKCH[:, :, :, None]).reshape(B, S, K, H)
  dv_BSKH = _unblock(dv_nBKCH[:, :, :, None]).reshape(B, S, K, H)
  return (dq_BQNH.astype(q_nBKGQH.dtype), dk_BSKH.astype(k_nBKCH.dtype), dv_BSKH.astype(v_nBKCH.dtype), None,
          None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q_BQNH, k_BSKH, v_BSKH, seg_BS, starts_P, bq: int, bk: int):
  return _forward(q_BQNH, k_BSKH, v_BSKH, seg_BS, starts_P, bq, bk)[0]


_attention.defvjp(lambda q, k, v, seg, starts, bq, bk: _forward(q, k, v, seg, starts, bq, bk), _backward)


def blocked_attention(q_BQNH, k_BSKH, v_BSKH, seg_BS, starts_P, block_q: int, block_kv: int) -> jax.Array:
  """softmax(q k^T / sqrt(H)) v, causal and within documents (int32 segment ids of the keys' positions),
  for queries that are P equal pieces of the keys' sequence starting at starts_P (int32; [0] when q is
  the whole sequence), as `per_shard.run` passes them.

  Blocks larger than a piece (query) or the sequence (keys) shrink to it; those must be multiples of
  them (config.validate and attention.context_problem check it at start-up).
  """
  Sq, S = q_BQNH.shape[1], k_BSKH.shape[1]
  piece = Sq // starts_P.shape[0]
  bq, bk = min(block_q, piece), min(block_kv, S)
  if piece % bq or S % bk:
    raise ValueError(f"blocked attention: query pieces of {piece} and keys of {S} are not multiples of blocks "
                     f"({bq}, {bk})")
  return _attention(q_BQNH, k_BSKH, v_BSKH, seg_BS.astype(jnp.int32), starts_P.astype(jnp.int32), bq, bk)
