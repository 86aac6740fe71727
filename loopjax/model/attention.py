"""The attention core softmax(q k^T / sqrt(H)) v, causal and within documents, behind one switch.

`model.attention` picks the implementation (all exact; they differ in memory, speed and where they run):

  xla      `jax.nn.dot_product_attention` with a dense [B, 1, S, S] document mask: O(S^2) scores per
           head. Any backend; float64 runs (numerical checks) take an einsum path in float64.
  blocked  pure-JAX flash-style attention (`blocked_attention.py`): only blocks on or below the
           diagonal, O(S) memory, a backward pass that recomputes. Any backend.
  splash   the Pallas TPU kernel `splash_attention` (causal mask + segment ids, its own backward),
           its queries split over the context axis (`splash_attention.py`). TPU only (tests use its
           interpret mode on CPU).
  native   a fused C++ kernel for XLA:CPU (`native_attention.py`): forward and backward in one pass per
           (row, head) with the scores in cache, float32, O(S) memory. CPU only; built on first use with
           the host's C++ compiler, so where there is none (or float64) `resolve` falls back to blocked.
  pallas_gpu  JAX's Pallas GPU flash kernel with segment ids (`gpu_attention.py`), forward and backward:
           GPU training with documents. Whole sequences only (no context parallelism).
  cudnn    cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`,
           GPU only, bf16/f16 only. That API takes no segment ids (only a dense mask, O(S^2) again),
           so rows that hold several documents cannot use it: `resolve` takes pallas_gpu, saying so.
  auto     `AUTO[platform]`, subject to the same limits.

Under a mesh, the kernels (blocked, native, splash, pallas_gpu) run per device (`per_shard.py`), each on
its own chunk of the queries against the keys gathered over the context axis; the xla path is
partitioned by XLA the same way. With context parallelism the training step runs the tokens in the
load-balanced order (`token_order.py`, `Mask.balanced`), and every implementation masks by natural
positions.

`resolve` turns the switch into an implementation for a platform (the trainer does it for the mesh's
devices, so an ahead-of-time TPU compile on a CPU host gets splash); the model resolves `auto` itself,
for the default backend, when it runs outside a trainer.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from loopjax import sharding
from loopjax.model import gpu_attention, native_attention, per_shard, splash_attention, token_order
from loopjax.model.blocked_attention import blocked_attention

IMPLEMENTATIONS = ("auto", "xla", "blocked", "native", "splash", "pallas_gpu", "cudnn")
AVAILABLE = {"cpu": ("xla", "blocked", "native"), "gpu": ("xla", "blocked", "pallas_gpu", "cudnn"),
             "tpu": ("xla", "blocked", "splash")}
# CPU: native, where it builds (else blocked). Forward + backward on 2 CPU cores (bench/bench_attention.py;
# B 8, 8 heads of 32, 4 documents per row, AMD EPYC, 2026-12-03): seq 256 blocked/64 20-21 ms, native
# 8-8.5 ms; seq 1024 blocked/64 270-274 ms, native 58-62 ms. The peer training step at T=4 (bench_train.py
# --tables peer) is 1.08-1.40x faster with native in four runs (BENCHMARKS.md, "The native CPU attention
# core"; "Attention" has the history).
AUTO = {"cpu": "native", "gpu": "pallas_gpu", "tpu": "splash"}  # GPU: cudnn for rows without documents
# Block size when model.attention_block_q/_kv is 0: blocked's fastest on CPU (64: a block's scores stay in
# cache; 128 made its backward 1.4-2x slower at seq 256 and 1024, 2026-12-02); MaxText's on TPU.
DEFAULT_BLOCK = {"blocked": 64, "splash": 512}
SPLASH_TILE = 128  # splash blocks (and so the sequence) are multiples of the TPU's 128 lanes
CUDNN_DTYPES = ("bfloat16", "float16")
PALLAS_GPU_DTYPES = ("bfloat16", "float16", "float32")
WHOLE_SEQUENCES = ("pallas_gpu", "cudnn")  # their causal masks align query i with key i: no query chunks


class Mask(NamedTuple):
  """What the core needs besides q, k, v: the documents and the implementation (static) with its blocks."""
  segment_ids_BS: jax.Array | None  # 0 = padding, 1.. = documents; None = one document per row
  impl: str  # one of IMPLEMENTATIONS
  block_q: int = 0  # 0 = DEFAULT_BLOCK of the implementation
  block_kv: int = 0
  balanced: int = 1  # the tokens are in the load-balanced order of this many context shards (1 = natural)


def platform_of(platform: str) -> str:
  """"cuda"/"rocm" are "gpu" here; "cpu" and "tpu" stay."""
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def resolve(impl: str, platform: str, compute_dtype: str, documents: bool, context: int = 1) -> tuple[str, str]:
  """(implementation, note): `auto` made concrete for `platform` (on GPU: cudnn for rows without documents in
  bf16/f16, else pallas_gpu; blocked under context parallelism, `context` > 1, since the GPU kernels run
  whole sequences), and the fall-backs: cudnn's to pallas_gpu where it cannot express the mask (several
  documents per row) or the dtype, pallas_gpu's and native's to blocked in float64 (and native's, for
  auto, where it cannot be built). The note says why ("" if none)."""
  platform = platform_of(platform)
  chosen = AUTO.get(platform, "xla") if impl == "auto" else impl
  if chosen == "native":
    if compute_dtype == "float64":
      return "blocked", "model.attention: native runs in float32, not float64; using blocked attention"
    if impl == "auto" and (why := native_attention.problem()):
      return "blocked", f"model.attention: auto would take native, but {why}; using blocked attention"
  if impl == "auto" and platform == "gpu":
    if context > 1:
      return "blocked", (f"model.attention: the GPU kernels run whole sequences and mesh.context={context} splits "
                         "them; using blocked attention, which splits the work")
    chosen = "cudnn" if not documents and compute_dtype in CUDNN_DTYPES else "pallas_gpu"
  note = ""
  if chosen == "cudnn" and (documents or compute_dtype not in CUDNN_DTYPES):
    why = ("cannot express document masking (jax.nn.dot_product_attention takes no segment ids, only a dense "
           "O(S^2) mask)" if documents else f"runs in {CUDNN_DTYPES}, not {compute_dtype}")
    chosen, note = "pallas_gpu", f"model.attention: cudnn {why}; using the Pallas GPU kernel (pallas_gpu)"
  if chosen == "pallas_gpu" and compute_dtype not in PALLAS_GPU_DTYPES:
    return "blocked", (f"model.attention: pallas_gpu runs in {PALLAS_GPU_DTYPES}, not {compute_dtype}; using "
                       "blocked attention")
  return chosen, note


def block_size(impl: str, block: int, seq_len: int) -> int:
  """The block an implementation uses: the configured one (0: its default) capped at the sequence; a
  default that does not tile the sequence becomes the whole sequence (an explicit one is checked)."""
  size = min(block or DEFAULT_BLOCK.get(impl, seq_len), seq_len)
  return size if block or seq_len % size == 0 else seq_len


def backend_problem(impl: str, platform: str, seq_len: int, block_q: int, block_kv: int,
                    context: int = 1) -> tuple[str, str, str] | None:
  """(config field, problem, fix) if a resolved implementation cannot run on `platform` at `seq_len` with
  the sequence split over `context` devices, else None."""
  platform = platform_of(platform)
  available = AVAILABLE.get(platform, ("xla", "blocked"))
  if impl not in available:
    return ("model.attention", f"{impl!r} does not run on {platform} devices",
            f"use one of {('auto', *available)} (auto picks {AUTO.get(platform, 'xla')} here)")
  if impl == "native" and (why := native_attention.problem()):
    return ("model.attention", f"native cannot run here: {why}",
            "install a C++ compiler (g++) or use model.attention=blocked")
  if impl in WHOLE_SEQUENCES and context > 1:
    return ("model.attention", f"{impl} runs whole sequences (its causal mask has no query offset), but "
            f"mesh.context={context} splits them", "use model.attention=blocked (or auto), or mesh.context=1")
  if context > 1 and seq_len % (2 * context):
    return None  # config.validate names mesh.context
  piece = token_order.chunk_length(seq_len, context)  # the queries' contiguous pieces
  if impl in ("blocked", "splash") and block_q and piece % min(block_q, piece):
    return ("model.attention_block_q", f"{block_q} does not tile the load-balanced chunks of {piece} positions "
            f"(train.seq_len={seq_len} / (2 x mesh.context={context}))", f"use a divisor of {piece}, or 0 (default)")
  if impl == "splash":
    blocks = (block_size(impl, block_q, piece), block_size(impl, block_kv, seq_len))
    if piece % SPLASH_TILE or any(b % SPLASH_TILE for b in blocks):
      what = f"seq_len {seq_len}" + (f" in chunks of {piece} (seq_len / (2 x mesh.context))" if context > 1 else "")
      return ("model.attention", f"splash needs the query chunks and its blocks {blocks} to be multiples of "
              f"{SPLASH_TILE}, got {what}", f"use a seq_len (per chunk) and model.attention_block_q/_kv that are "
              f"multiples of {SPLASH_TILE}, or model.attention='blocked'")
  if impl == "pallas_gpu" and (seq_len % 32 or (seq_len > gpu_attention.TILE and seq_len % gpu_attention.TILE)):
    return ("train.seq_len", f"pallas_gpu tiles the sequence by {gpu_attention.TILE} rows (32 below that), got "
            f"{seq_len}", f"use a multiple of {gpu_attention.TILE}, or model.attention='blocked'")
  return None


def attention_mask(segment_ids_BS: jax.Array | None, positions_S=None) -> jax.Array | None:
  """[B or 1, 1, S, S] boolean: causal and within the same (non-padding) document; None if unpacked and in
  natural order. positions_S: each token's natural position, for a sequence in another order (None:
  natural)."""
  if segment_ids_BS is None and positions_S is None:
    return None
  if positions_S is None:
    causal = jnp.tril(jnp.ones((segment_ids_BS.shape[1],) * 2, dtype=bool))
  else:
    causal = jnp.asarray(positions_S)[:, None] >= jnp.asarray(positions_S)[None, :]
  if segment_ids_BS is None:
    return causal[None, None]
  same_doc = segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :]
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


def xla(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, balanced: int = 1) -> jax.Array:
  """The dense path: a [B, 1, S, S] mask and XLA's attention (float64: einsum in float64). XLA partitions
  it; keys and values are gathered over the context axis ("kv_seq")."""
  k_BSKH, v_BSKH = (sharding.constrain(x, ("batch", "kv_seq", "act_heads", None)) for x in (k_BSKH, v_BSKH))
  positions_S = token_order.positions(q_BSNH.shape[1], balanced) if balanced > 1 else None
  mask_B1SS = attention_mask(segment_ids_BS, positions_S)
  if q_BSNH.dtype == jnp.float64:
    return float64_attention(q_BSNH, k_BSKH, v_BSKH, mask_B1SS)
  return jax.nn.dot_product_attention(q_BSNH, k_BSKH, v_BSKH, mask=mask_B1SS, is_causal=mask_B1SS is None,
                                      scale=q_BSNH.shape[-1] ** -0.5)


def cudnn(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS) -> jax.Array:
  """cuDNN flash attention, causal, one document per row, whole sequences (`resolve` picks it for no other)."""
  if segment_ids_BS is not None:
    raise ValueError("cudnn attention cannot express document masking (segment ids); use pallas_gpu")
  return jax.nn.dot_product_attention(q_BSNH, k_BSKH, v_BSKH, is_causal=True, scale=q_BSNH.shape[-1] ** -0.5,
                                      implementation="cudnn")


def query_piece(seq_len: int, balanced: int) -> int:
  """The length of the contiguous query pieces each device's kernel runs on under the current mesh."""
  return token_order.pieces(seq_len, balanced, seq_len // token_order.context_shards())[1]


def splash(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, block_q: int, block_kv: int, balanced: int = 1,
           interpret: bool = False):
  """Pallas splash attention, each device on its own queries (`splash_attention.py`)."""
  S = q_BSNH.shape[1]
  bq, bk = block_size("splash", block_q, query_piece(S, balanced)), block_size("splash", block_kv, S)
  return splash_attention.splash(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, balanced, bq, bk, interpret)


def blocked(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, block_q: int, block_kv: int, balanced: int = 1):
  """The blocked core, each device on its own queries (`per_shard.py`)."""
  S = q_BSNH.shape[1]
  bq, bk = block_size("blocked", block_q, query_piece(S, balanced)), block_size("blocked", block_kv, S)
  local = lambda q, k, v, seg, starts: blocked_attention(q, k, v, seg, starts, bq, bk)
  return per_shard.run(local, q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, balanced)


def native(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, balanced: int = 1):
  """The native CPU kernel (`native_attention.py`), each device on its own queries."""
  return per_shard.run(native_attention.native_attention, q_BSNH, k_BSKH, v_BSKH, segment_ids_BS, balanced)


def core(q_BSNH, k_BSKH, v_BSKH, mask: Mask | None, compute_dtype: str) -> jax.Array:
  """The dispatcher: `mask.impl` (auto resolved for the default backend and mesh), causal-only when mask is
  None. q, k and v are split along the sequence like the activations; each implementation gathers k, v."""
  mask = mask or Mask(None, "auto")
  seg, balanced = mask.segment_ids_BS, mask.balanced
  impl, _ = resolve(mask.impl, jax.default_backend(), compute_dtype, seg is not None, token_order.context_shards())
  if impl == "blocked":
    return blocked(q_BSNH, k_BSKH, v_BSKH, seg, mask.block_q, mask.block_kv, balanced)
  if impl == "splash":
    return splash(q_BSNH, k_BSKH, v_BSKH, seg, mask.block_q, mask.block_kv, balanced)
  if impl == "native":
    return native(q_BSNH, k_BSKH, v_BSKH, seg, balanced)
  if impl in WHOLE_SEQUENCES and (balanced > 1 or token_order.context_shards() > 1):
    raise ValueError(f"{impl} attention runs whole sequences in natural order; use blocked under context parallelism")
  if impl == "pallas_gpu":
    return gpu_attention.pallas_gpu(q_BSNH, k_BSKH, v_BSKH, seg)
  if impl == "cudnn":
    return cudnn(q_BSNH, k_BSKH, v_BSKH, seg)
  return xla(q_BSNH, k_BSKH, v_BSKH, seg, balanced)


def model_mask(model_cfg, segment_ids_BS: jax.Array | None, balanced: int = 1) -> Mask:
  """The `Mask` a model built from the `model` config section passes to every layer; `balanced`: the
  tokens' order (`token_order`)."""
  return Mask(segment_ids_BS, model_cfg.attention, model_cfg.attention_block_q, model_cfg.attention_block_kv,
              balanced)
