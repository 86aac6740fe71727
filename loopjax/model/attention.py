"""The attention core softmax(q k^T / sqrt(H)) v, causal and within documents, behind one switch.

`model.attention` picks the implementation (all exact; they differ in memory, speed and where they run):

  xla      `jax.nn.dot_product_attention` with a dense [B, 1, S, S] document mask: O(S^2) scores per
           head. Any backend; float64 runs (numerical checks) take an einsum path in float64.
  blocked  pure-JAX flash-style attention (`blocked_attention.py`): only blocks on or below the
           diagonal, O(S) memory, a backward pass that recomputes. Any backend.
  splash   the Pallas TPU kernel `splash_attention` (causal mask + segment ids, its own backward),
           run per shard under `shard_map`. TPU only (tests use its interpret mode on CPU).
  native   a fused C++ kernel for XLA:CPU (`native_attention.py`): forward and backward in one pass per
           (row, head) with the scores in cache, float32, O(S) memory. CPU only; built on first use with
           the host's C++ compiler, so where there is none (or float64) `resolve` falls back to blocked.
  cudnn    cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`,
           GPU only, bf16/f16 only. That API takes no segment ids (only a dense mask, O(S^2) again),
           so rows that hold several documents cannot use it: `resolve` falls back to blocked, saying so.
  auto     `AUTO[platform]`, subject to the same limits.

`resolve` turns the switch into an implementation for a platform (the trainer does it for the mesh's
devices, so an ahead-of-time TPU compile on a CPU host gets splash); the model resolves `auto` itself,
for the default backend, when it runs outside a trainer.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from loopjax.model import native_attention
from loopjax.model.blocked_attention import blocked_attention
from loopjax.sharding import logical_to_spec

IMPLEMENTATIONS = ("auto", "xla", "blocked", "native", "splash", "cudnn")
AVAILABLE = {"cpu": ("xla", "blocked", "native"), "gpu": ("xla", "blocked", "cudnn"), "tpu": ("xla", "blocked", "splash")}
# CPU: native, where it builds (else blocked). Forward + backward on 2 CPU cores (bench/bench_attention.py;
# B 8, 8 heads of 32, 4 documents per row, AMD EPYC, 2026-12-03): seq 256 blocked/64 20-21 ms, native
# 8-8.5 ms; seq 1024 blocked/64 270-274 ms, native 58-62 ms. The peer training step at T=4 (bench_train.py
# --tables peer) is 1.08-1.40x faster with native in four runs (BENCHMARKS.md, "The native CPU attention
# core"; "Attention" has the history).
AUTO = {"cpu": "native", "gpu": "cudnn", "tpu": "splash"}
# Block size when model.attention_block_q/_kv is 0: blocked's fastest on CPU (64: a block's scores stay in
# cache; 128 made its backward 1.4-2x slower at seq 256 and 1024, 2026-12-02); MaxText's on TPU.
DEFAULT_BLOCK = {"blocked": 64, "splash": 512}
SPLASH_TILE = 128  # splash blocks (and so the sequence) are multiples of the TPU's 128 lanes
CUDNN_DTYPES = ("bfloat16", "float16")


class Mask(NamedTuple):
  """What the core needs besides q, k, v: the documents and the implementation (static) with its blocks."""
  segment_ids_BS: jax.Array | None  # 0 = padding, 1.. = documents; None = one document per row
  impl: str  # one of IMPLEMENTATIONS
  block_q: int = 0  # 0 = DEFAULT_BLOCK of the implementation
  block_kv: int = 0


def platform_of(platform: str) -> str:
  """"cuda"/"rocm" are "gpu" here; "cpu" and "tpu" stay."""
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def resolve(impl: str, platform: str, compute_dtype: str, documents: bool) -> tuple[str, str]:
  """(implementation, note): `auto` made concrete for `platform`, and the fall-backs to blocked: cudnn's
  where it cannot express the mask (several documents per row) or the dtype, native's in float64 (and,
  for auto, where it cannot be built). The note says why ("" if none)."""
  platform = platform_of(platform)
  chosen = AUTO.get(platform, "xla") if impl == "auto" else impl
  if chosen == "native":
    if compute_dtype == "float64":
      return "blocked", "model.attention: native runs in float32, not float64; using blocked attention"
    if impl == "auto" and (why := native_attention.problem()):
      return "blocked", f"model.attention: auto would take native, but {why}; using blocked attention"
  if chosen != "cudnn":
    return chosen, ""
  if documents:
    return "blocked", ("model.attention: cudnn cannot express document masking (jax.nn.dot_product_attention "
                       "takes no segment ids, only a dense O(S^2) mask); using blocked attention")
  if compute_dtype not in CUDNN_DTYPES:
    return "blocked", f"model.attention: cudnn runs in {CUDNN_DTYPES}, not {compute_dtype}; using blocked attention"
  return chosen, ""


def block_size(impl: str, block: int, seq_len: int) -> int:
  """The block an implementation uses: the configured one (0: its default) capped at the sequence; a
  default that does not tile the sequence becomes the whole sequence (an explicit one is checked)."""
  size = min(block or DEFAULT_BLOCK.get(impl, seq_len), seq_len)
  return size if block or seq_len % size == 0 else seq_len


def backend_problem(impl: str, platform: str, seq_len: int, block_q: int, block_kv: int) -> tuple[str, str] | None:
  """(problem, fix) if a resolved implementation cannot run on `platform` at `seq_len`, else None."""
  platform = platform_of(platform)
  available = AVAILABLE.get(platform, ("xla", "blocked"))
  if impl not in available:
    return (f"{impl!r} does not run on {platform} devices",
            f"use one of {('auto', *available)} (auto picks {AUTO.get(platform, 'xla')} here)")
  if impl == "native" and (why := native_attention.problem()):
    return f"native cannot run here: {why}", "install a C++ compiler (g++) or use model.attention=blocked"
  if impl == "splash":
    blocks = (block_size(impl, block_q, seq_len), block_size(impl, block_kv, seq_len))
    if seq_len % SPLASH_TILE or any(b % SPLASH_TILE for b in blocks):
      return (f"splash needs train.seq_len and its blocks {blocks} to be multiples of {SPLASH_TILE}, got "
              f"seq_len {seq_len}", f"use a seq_len and model.attention_block_q/_kv that are multiples of "
              f"{SPLASH_TILE}, or model.attention='blocked'")
  return None


def attention_mask(segment_ids_BS: jax.Array | None) -> jax.Array | None:
  """[B, 1, S, S] boolean: causal and within the same (non-padding) document; None if unpacked."""
  if segment_ids_BS is None:
    return None
  same_doc = segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :]
  seq = segment_ids_BS.shape[1]
  causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
  # Padding rows (segment 0) still attend to themselves so softmax never sees an empty row.
  return (same_doc & causal)[:, None]


def float64_attention(q_BSNH, k_BSKH, v_BSKH, mask_B1SS) -> jax.Array:
  """Causal softmax attention entirely in the inputs' dtype.

  `jax.nn.dot_product_attention` always takes the softmax in float32; float64 runs (gradient and
  numerical checks) use this instead so nothing in the model rounds to float32.
  """
  B, S, N, H = q_BSNH.shape
  K = k_BSKH.shape[2]
  q_BSKGH = q_BSNH.reshape(B, S, K, N // K, H)
  scores_BKGST = jnp.einsum("bskgh,btkh->bkgst", q_BSKGH, k_BSKH) * H**-0.5
  allowed = jnp.tril(jnp.ones((S, S), bool)) if mask_B1SS is None else mask_B1SS[:, :, None]
  weights = jax.nn.softmax(jnp.where(allowed, scores_BKGST, -jnp.inf), axis=-1)
  return jnp.einsum("bkgst,btkh->bskgh", weights, v_BSKH).reshape(B, S, N, H)


def xla(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS) -> jax.Array:
  """The dense path: a [B, 1, S, S] mask and XLA's attention (float64: einsum in float64)."""
  mask_B1SS = attention_mask(segment_ids_BS)
  if q_BSNH.dtype == jnp.float64:
    return float64_attention(q_BSNH, k_BSKH, v_BSKH, mask_B1SS)
  return jax.nn.dot_product_attention(q_BSNH, k_BSKH, v_BSKH, mask=mask_B1SS, is_causal=mask_B1SS is None,
                                      scale=q_BSNH.shape[-1] ** -0.5)


def cudnn(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS) -> jax.Array:
  """cuDNN flash attention, causal, one document per row (`resolve` never picks it for packed rows)."""
  if segment_ids_BS is not None:
    raise ValueError("cudnn attention cannot express document masking (segment ids); use blocked")
  return jax.nn.dot_product_attention(q_BSNH, k_BSKH, v_BSKH, is_causal=True, scale=q_BSNH.shape[-1] ** -0.5,
                                      implementation="cudnn")


def _splash_kernel(heads: int, seq: int, block_q: int, block_kv: int, mqa: bool, interpret: bool):
  """A causal splash kernel over `heads` query heads (segment ids come with each call)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  bq, bk = block_size("splash", block_q, seq), block_size("splash", block_kv, seq)
  sizes = kernels.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                             block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  mask = masks.MultiHeadMask([masks.CausalMask((seq, seq))] * heads)
  make = kernels.make_splash_mqa if mqa else kernels.make_splash_mha
  return make(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret), kernels.SegmentIds


def _splash_local(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, block_q: int, block_kv: int, interpret: bool):
  """Splash on one device's shard: per row, [N, S, H] heads-major (MHA) or per kv head (GQA, MQA kernel)."""
  B, S, N, H = q_BSNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  kernel, segment_ids = _splash_kernel(N if G == 1 else G, S, block_q, block_kv, G > 1, interpret)
  q_BNSH = jnp.swapaxes(q_BSNH * jnp.asarray(H**-0.5, q_BSNH.dtype), 1, 2)  # splash applies no scale
  k_BKSH, v_BKSH = jnp.swapaxes(k_BSKH, 1, 2), jnp.swapaxes(v_BSKH, 1, 2)

  def row(q_NSH, k_KSH, v_KSH, seg_S):
    ids = segment_ids(q=seg_S, kv=seg_S)
    if G == 1:
      return kernel(q_NSH, k_KSH, v_KSH, ids)
    per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    return per_kv_head(q_NSH.reshape(K, G, S, H), k_KSH, v_KSH, ids).reshape(N, S, H)

  return jnp.swapaxes(jax.vmap(row)(q_BNSH, k_BKSH, v_BKSH, segment_ids_BS), 1, 2)


def _per_shard(local, q_BSNH, k_BSKH, v_BSKH, segment_ids_BS):
  """`local(q, k, v, seg_BS)` on each device's shard of the batch and heads (the sequence whole): XLA does
  not partition a kernel call (Pallas, FFI), so under a mesh it runs through `shard_map`."""
  B, S = q_BSNH.shape[:2]
  seg_BS = jnp.zeros((B, S), jnp.int32) if segment_ids_BS is None else segment_ids_BS.astype(jnp.int32)
  if jax.sharding.get_abstract_mesh().empty:
    return local(q_BSNH, k_BSKH, v_BSKH, seg_BS)
  heads = logical_to_spec(("batch", None, "act_heads", None))
  return jax.shard_map(local, in_specs=(heads, heads, heads, logical_to_spec(("batch", None))), out_specs=heads,
                       check_vma=False)(q_BSNH, k_BSKH, v_BSKH, seg_BS)


def splash(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, block_q: int, block_kv: int, interpret: bool = False):
  """Pallas splash attention, per shard."""
  local = functools.partial(_splash_local, block_q=block_q, block_kv=block_kv, interpret=interpret)
  return _per_shard(local, q_BSNH, k_BSKH, v_BSKH, segment_ids_BS)


def native(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS):
  """The native CPU kernel (`native_attention.py`), per shard."""
  return _per_shard(native_attention.native_attention, q_BSNH, k_BSKH, v_BSKH, segment_ids_BS)


def core(q_BSNH, k_BSKH, v_BSKH, mask: Mask | None, compute_dtype: str) -> jax.Array:
  """The dispatcher: `mask.impl` (auto resolved for the default backend), causal-only when mask is None."""
  mask = mask or Mask(None, "auto")
  impl, _ = resolve(mask.impl, jax.default_backend(), compute_dtype, mask.segment_ids_BS is not None)
  if impl == "blocked":
    seq = q_BSNH.shape[1]
    return blocked_attention(q_BSNH, k_BSKH, v_BSKH, mask.segment_ids_BS, block_size(impl, mask.block_q, seq),
                             block_size(impl, mask.block_kv, seq))
  if impl == "splash":
    return splash(q_BSNH, k_BSKH, v_BSKH, mask.segment_ids_BS, mask.block_q, mask.block_kv)
  if impl == "native":
    return native(q_BSNH, k_BSKH, v_BSKH, mask.segment_ids_BS)
  if impl == "cudnn":
    return cudnn(q_BSNH, k_BSKH, v_BSKH, mask.segment_ids_BS)
  return xla(q_BSNH, k_BSKH, v_BSKH, mask.segment_ids_BS)


def model_mask(model_cfg, segment_ids_BS: jax.Array | None) -> Mask:
  """The `Mask` a model built from the `model` config section passes to every layer."""
  return Mask(segment_ids_BS, model_cfg.attention, model_cfg.attention_block_q, model_cfg.attention_block_kv)
