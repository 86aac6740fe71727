"""How much a native CPU attention core would buy: the prototype FFI forward vs the blocked core's.

python bench/bench_native_attention.py [--batch 8 --heads 8 --head_dim 32 --seqs 256,1024]

Builds `bench/native_attention/attention_cpu.cc` with g++ (-O3 -march=native) into a temporary folder,
registers it as an XLA:CPU custom call, checks its output and logsumexp against the blocked core's
(float32, stated tolerance), and prints the forward time of both, interleaved. Rows hold 4 documents;
"useful GF/s" counts only the flops of allowed (same-document, causal) pairs, which both kernels exceed
(they compute every causal pair and mask).
A prototype for issue 11: the forward only, not wired into loopjax/model.
"""

import argparse
import ctypes
import pathlib
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from bench_attention import time_call
from loopjax.model import blocked_attention as blocked

SOURCE = pathlib.Path(__file__).parent / "native_attention" / "attention_cpu.cc"
TOLERANCE = 2e-5  # float32 max abs error of out (inputs of unit scale), either way of summing


def build_and_register() -> None:
  library = pathlib.Path(tempfile.mkdtemp()) / "attention_cpu.so"
  subprocess.run(["g++", "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}",
                  str(SOURCE), "-o", str(library)], check=True, capture_output=True)  # XLA's headers warn
  handle = ctypes.cdll.LoadLibrary(str(library))
  jax.ffi.register_ffi_target("loopjax_attention_forward", jax.ffi.pycapsule(handle.LoopjaxAttentionForward),
                              platform="cpu")


def native_forward(q_BSNH, k_BSKH, v_BSKH, seg_BS):
  B, S, N, H = q_BSNH.shape
  shapes = (jax.ShapeDtypeStruct(q_BSNH.shape, jnp.float32), jax.ShapeDtypeStruct((B, N, S), jnp.float32))
  return jax.ffi.ffi_call("loopjax_attention_forward", shapes)(q_BSNH, k_BSKH, v_BSKH, seg_BS)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv_heads", type=int, default=8)
  parser.add_argument("--head_dim", type=int, default=32)
  parser.add_argument("--seqs", default="256,1024")
  parser.add_argument("--block", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  build_and_register()
  print(f"{'seq':>6} {'impl':>10} {'fwd ms':>8} {'CPU ms':>8} {'useful GF/s':>11} {'max err':>9}")
  for seq in map(int, args.seqs.split(",")):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (args.batch, seq, args.heads, args.head_dim))
    k, v = (jax.random.normal(key, (args.batch, seq, args.kv_heads, args.head_dim)) for key in keys[1:])
    seg = jnp.asarray(np.repeat(np.arange(1, 5), seq // 4)[None].repeat(args.batch, 0), jnp.int32)
    bq = min(args.block, seq)
    ref = jax.jit(lambda q, k, v, s: blocked._forward(q, k, v, s, bq, bq))
    out_ref, residuals = ref(q, k, v, seg)
    lse_ref = blocked._unblock(residuals[-1][..., None])[..., 0]  # [B, S, K, G]
    fast = jax.jit(native_forward)
    out, lse = fast(q, k, v, seg)
    error = float(jnp.abs(out - out_ref).max())
    lse_error = float(jnp.abs(lse - lse_ref.reshape(args.batch, seq, args.heads).transpose(0, 2, 1)).max())
    assert error < TOLERANCE and lse_error < TOLERANCE, (error, lse_error)
    # Causal flops within documents of seq / 4: 2 matmuls of 2 * H flops per allowed (query, key) pair.
    pairs = args.batch * args.heads * 4 * (seq // 4) * (seq // 4 + 1) / 2
    gflop = 4 * args.head_dim * pairs / 1e9
    for _ in range(args.rounds):
      for name, fn in ((f"blocked/{bq}", ref), ("native", fast)):
        wall, cpu = time_call(fn, q, k, v, seg)
        print(f"{seq:>6} {name:>10} {1e3 * wall:>8.2f} {1e3 * cpu:>8.2f} {gflop / wall:>11.1f} "
              f"{error if name == 'native' else 0:>9.1e}", flush=True)


if __name__ == "__main__":
  main()
