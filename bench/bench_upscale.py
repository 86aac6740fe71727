"""`loopjax upscale` at real size: an Ouro-1.4B-shaped checkpoint of random bfloat16 params -> 2.6B.

  python bench/bench_upscale.py [--dir /tmp/loopjax_bench_upscale] [--mapping interleave] [--keep]

1. A child process writes the input: a params-only loopjax checkpoint (Checkpointer.save) of
   configs/ouro_1p4b.py's model with random bfloat16 parameters (~2.9 GB), FSDP-sharded over
   --input_devices fake CPU devices. With 8 the stored chunks are a training run's shards (1/8 of an
   array); with 1 every array is one stored chunk (a layer array up to 553 MB), the worst case.
2. `loopjax upscale --layers 48` runs as the only child of a small wrapper process, which reports the
   child's wall time and peak resident memory (getrusage RUSAGE_CHILDREN: ru_maxrss).
3. The output is restored to host memory (`restore_params`, which checks the checksum the upscale
   computed while streaming) and three layers are compared with their source layers.
The goal: peak RSS <= 0.5 x the output's array bytes. Both checkpoints are deleted unless --keep.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPJAX = os.path.join(os.path.dirname(sys.executable), "loopjax")

WRITE_INPUT = textwrap.dedent("""
    import json, sys
    import jax, ml_dtypes, numpy as np
    from loopjax import checkpoint, sharding
    from loopjax.config import load_config_file
    from loopjax.train.state import model_graph, param_specs
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    cfg = load_config_file("configs/ouro_1p4b.py")
    cfg.model.param_dtype = "bfloat16"
    rng = np.random.default_rng(0)
    # Random bfloat16 bit patterns: random sign and mantissa, exponent 2**-7 (finite, |x| in [0.0078, 0.0156)).
    draw = lambda a: ((rng.integers(0, 2**16, a.shape, dtype=np.uint16) & 0x807F) | 0x3C00).view(ml_dtypes.bfloat16)
    params = jax.tree.map(draw, nnx.to_pure_dict(model_graph(cfg.model)[1]))
    mesh = sharding.make_mesh((1, jax.device_count(), 1, 1))  # FSDP over the devices, as configs/ouro_1p4b.py
    specs = param_specs(cfg.model)
    params = jax.device_put(params, jax.tree.map(lambda p: NamedSharding(mesh, p), specs,
                                                 is_leaf=lambda x: isinstance(x, P)))
    ckpt = checkpoint.Checkpointer(sys.argv[1], async_save=False)
    ckpt.save(1000, {"params": params}, meta={"phase": "1a", "config": json.loads(cfg.to_json())})
    ckpt.close()
""")

MEASURE = textwrap.dedent("""
    import json, resource, subprocess, sys, time
    start = time.perf_counter()
    out = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    print(json.dumps({"returncode": out.returncode, "seconds": time.perf_counter() - start,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                      "output": out.stdout + out.stderr[-2000:]}))
""")


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default="/tmp/loopjax_bench_upscale")
  parser.add_argument("--mapping", default="interleave")
  parser.add_argument("--input_devices", default="8,1", help="comma-separated: one run per device count")
  parser.add_argument("--keep", action="store_true")
  args = parser.parse_args()
  for devices in args.input_devices.split(","):
    run(args, int(devices))


def run(args, devices: int):
  src, dst = os.path.join(args.dir, "in", "checkpoints"), os.path.join(args.dir, "out", "checkpoints")
  shutil.rmtree(args.dir, ignore_errors=True)
  try:
    start = time.perf_counter()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    subprocess.run([sys.executable, "-c", WRITE_INPUT, src], cwd=REPO, check=True, env=env)
    print(f"\ninput on {devices} device(s), written in {time.perf_counter() - start:.0f} s: "
          f"{dir_bytes(src) / 1e9:.2f} GB on disk")
    result = json.loads(subprocess.run(
        [sys.executable, "-c", MEASURE, LOOPJAX, "upscale", "--from", src, "--to", dst, "--layers", "48",
         "--mapping", args.mapping], capture_output=True, text=True, check=True).stdout)
    assert result["returncode"] == 0, result["output"]
    verify(src, dst, result, args.mapping)
  finally:
    if not args.keep:
      shutil.rmtree(args.dir, ignore_errors=True)


def verify(src: str, dst: str, result: dict, mapping: str):
  import jax
  import numpy as np
  import tensorstore as ts

  from loopjax.checkpoint import restore_params
  from loopjax.upscale import layer_index
  start = time.perf_counter()
  params = restore_params(dst).items["params"]  # raises if the checksum computed while streaming is wrong
  restore_seconds = time.perf_counter() - start
  leaves = jax.tree.leaves(params)
  out_bytes = sum(x.nbytes for x in leaves)
  index = layer_index(24, 48, mapping)
  source = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{src}/1000/params/",
                                                  "path": "stack.w_gate"}}).result()
  for j in (0, 17, 47):
    np.testing.assert_array_equal(params["stack"]["w_gate"][j], source[int(index[j])].read().result())
  assert params["stack"]["wq"].shape[0] == 48
  peak = result["peak_rss_bytes"]
  print("| output params | output array bytes | on disk | upscale wall time | peak RSS | peak / output |")
  print("| --- | --- | --- | --- | --- | --- |")
  print(f"| {sum(x.size for x in leaves):,} | {out_bytes / 1e9:.2f} GB | {dir_bytes(dst) / 1e9:.2f} GB | "
        f"{result['seconds']:.1f} s | {peak / 1e9:.2f} GB | {peak / out_bytes:.2f} |")
  print(f"verified: restore_params (checksum) in {restore_seconds:.0f} s; layers 0, 17, 47 of w_gate equal "
        f"their source layers; goal peak <= 0.5 x output: {'met' if peak <= 0.5 * out_bytes else 'NOT met'}")


if __name__ == "__main__":
  main()
