"""`loopjax export-hf` at real size: an Ouro-1.4B-shaped checkpoint of random bfloat16 params -> HF files.

  python bench/bench_export.py [--dir /tmp/loopjax_bench_export] [--input_devices 8,1] [--keep]

1. A child process writes the input, as bench/bench_upscale.py does: a params-only loopjax checkpoint of
   configs/ouro_1p4b.py's model with random bfloat16 parameters (~2.9 GB), FSDP-sharded over
   --input_devices fake CPU devices (8: a training run's chunks; 1: each array one chunk, up to 553 MB).
2. `loopjax export-hf` runs as the only child of a small wrapper process, which reports the child's wall
   time and peak resident memory (getrusage RUSAGE_CHILDREN: ru_maxrss); once with the default 5 GB
   shard limit (one model.safetensors) and once with --max_shard_size 1GB (shards + index).
3. The output is checked: its headers against the plan, and three layer tensors and the embedding
   against the stored source arrays (the export also verified the checkpoint's checksum while streaming).
The goal: peak RSS <= 0.5 x the output size. Everything is deleted unless --keep.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from bench_upscale import LOOPJAX, MEASURE, REPO, WRITE_INPUT, dir_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default="/tmp/loopjax_bench_export")
  parser.add_argument("--input_devices", default="8,1", help="comma-separated: one input layout per device count")
  parser.add_argument("--keep", action="store_true")
  args = parser.parse_args()
  print("| input stored as | output | files | wall time | peak RSS | peak / output |")
  print("| --- | --- | --- | --- | --- | --- |")
  for devices in args.input_devices.split(","):
    run(args, int(devices))


def run(args, devices: int):
  src = os.path.join(args.dir, "in", "checkpoints")
  shutil.rmtree(args.dir, ignore_errors=True)
  try:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", WRITE_INPUT, src], cwd=REPO, check=True, env=env)
    print(f"<!-- input on {devices} device(s) written in {time.perf_counter() - start:.0f} s: "
          f"{dir_bytes(src) / 1e9:.2f} GB on disk -->", flush=True)
    for shard_size in ("5GB", "1GB"):
      out = os.path.join(args.dir, f"hf-{shard_size}")
      result = json.loads(subprocess.run(
          [sys.executable, "-c", MEASURE, LOOPJAX, "export-hf", "--checkpoint", src, "--output", out,
           "--max_shard_size", shard_size], capture_output=True, text=True, check=True).stdout)
      assert result["returncode"] == 0, result["output"]
      files = verify(src, out)
      size, peak = dir_bytes(out), result["peak_rss_bytes"]
      print(f"| {devices} device(s) | {size / 1e9:.2f} GB | {files} | {result['seconds']:.1f} s | "
            f"{peak / 1e9:.2f} GB | {peak / size:.2f} |", flush=True)
      shutil.rmtree(out)
  finally:
    if not args.keep:
      shutil.rmtree(args.dir, ignore_errors=True)


def verify(src: str, out: str) -> str:
  """Checks headers and a few tensors against the stored source; returns a description of the files."""
  import numpy as np

  from loopjax.checkpoint.files import open_array
  from loopjax.config import load_config_file
  from loopjax.hf.plan import tensor_plan
  from loopjax.hf.tensorfile import TensorDir
  cfg = load_config_file(os.path.join(REPO, "configs", "ouro_1p4b.py"))
  exported = TensorDir(out)
  assert exported.shapes() == {p.name: p.shape for p in tensor_plan(cfg.model)}
  params = os.path.join(src, "1000", "params")
  w_gate = open_array(params, "stack.w_gate")
  for i in (0, 11, 23):
    np.testing.assert_array_equal(exported[f"model.layers.{i}.mlp.gate_proj.weight"], w_gate[i].read().result().T)
  np.testing.assert_array_equal(exported["model.embed_tokens.weight"], open_array(params, "embed").read().result())
  shards = len({info.file for info in exported.infos.values()})
  return "model.safetensors" if shards == 1 else f"{shards} shards + index"


if __name__ == "__main__":
  main()
