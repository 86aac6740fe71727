"""Several processes on one host share the compile cache and the native kernel's build safely: a real
`launch/local.sh 2 4` run from a cold compile cache and a cold native build, with a killed build's leftover."""

import glob
import os
import subprocess
import sys

import pytest

import _train_subprocess as ts
from loopjax.model import native_attention


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_from_cold_caches_build_the_native_kernel_once(tmp_path, monkeypatch):
  native, xla, logs = tmp_path / "native", tmp_path / "xla", tmp_path / "logs"
  monkeypatch.setenv("LOOPJAX_NATIVE_CACHE", str(native))
  library = native_attention.library_path(os.environ.get("CXX", "g++"))
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
             PYTHON=sys.executable, LOOPJAX_LOG_DIR=str(logs), JAX_PLATFORMS="cpu")
  native.mkdir()
  leftover = native / f"{library.name}.killed.partial"  # what a build killed midway leaves
  leftover.write_bytes(b"half a library")
  argv = [os.path.join(ts.REPO, "launch", "local.sh"), "2", "4", "--", *ts.command(str(tmp_path / "run")),
          "--config.train.steps=4", "--config.model.attention=native", f"--compile_cache={xla}"]
  proc = subprocess.run(argv, cwd=ts.REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  outputs = [(logs / f"process_{i}.log").read_text() for i in range(2)]
  assert sum(out.count("native attention: built") for out in outputs) == 1, outputs
  assert all("attention native (model.attention=native)" in out for out in outputs)
  assert [p.name for p in native.glob("*.so")] == [library.name] and not list(native.glob("*.partial"))
  assert (xla / ".lockfile").exists() and glob.glob(str(xla / "*-cache"))  # JAX's locked, shared cache
