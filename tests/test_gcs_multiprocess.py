"""Two JAX processes on localhost (4 CPU devices each) save, damage-check and restore a globally sharded
checkpoint on gs:// (fake-gcs-server, see test_gcs.py).

On a bucket each process writes its own OCDBT shard store and process 0 merges them and writes the
step's commit_success.txt (there is no rename to make the save atomic). The worker is this file run as
a script: `python test_gcs_multiprocess.py ID COUNT PORT DIRECTORY`.
"""

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.multiprocess]
SHAPE = (8, 8)


def _worker(process_id: int, count: int, port: int, directory: str):
  import jax
  jax.config.update("jax_num_cpu_devices", 4)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=count, process_id=process_id)
  import numpy as np
  from etils import epath
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from loopjax import checkpoint as ck
  from loopjax.checkpoint.listing import list_checkpoints
  sharding = NamedSharding(Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b")), PartitionSpec("a", "b"))
  full = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
  w = jax.make_array_from_callback(SHAPE, sharding, lambda index: full[index])
  ckpt = ck.Checkpointer(directory, async_save=True, keep=5)
  for step in (1, 2):
    ckpt.save(step, {"params": {"w": w * step}, "opt_state": {"mu": w + step}}, meta={"phase": "main"})
  ckpt.close()
  assert ckpt.all_steps() == [1, 2], ckpt.all_steps()
  rows = list_checkpoints(directory)  # a collective: a manager syncs the processes as it starts
  assert [(r["step"], r["complete"]) for r in rows] == [(1, True), (2, True)], rows
  if process_id == 0:
    (epath.Path(directory) / "2" / "params" / "_METADATA").unlink()  # damage the newest
  multihost_utils.sync_global_devices("damaged")
  ckpt = ck.Checkpointer(directory, keep=5)
  target = {"params": {"w": jax.ShapeDtypeStruct(SHAPE, w.dtype, sharding=sharding)}}
  restored = ck.restore_latest(ckpt, lambda step: (target, None))
  assert restored.step == 1 and ckpt.all_steps() == [1], (restored.step, ckpt.all_steps())
  for shard in restored.items["params"]["w"].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
  redo = restored.items["params"]["w"]
  ckpt.save(2, {"params": {"w": redo * 2}, "opt_state": {"mu": redo + 2}}, meta={"phase": "main"})  # redo the step
  ckpt.close()
  assert ckpt.all_steps() == [1, 2]
  print(f"process {process_id}: ok", flush=True)


def test_two_processes_save_quarantine_and_restore_on_gs(gcs, tmp_path):  # noqa: F811
  from etils import epath

  from test_gcs import _bucket_run, _free_port
  directory = _bucket_run("multiprocess") + "/checkpoints"
  port = _free_port()
  env = dict(os.environ, **gcs, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, __file__, str(i), "2", str(port), directory], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=180)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  for i, out in enumerate(outputs):
    assert f"process {i}: ok" in out
  corrupt = list(epath.Path(directory + "-corrupt").iterdir())
  assert [p.name.split("-")[0] for p in corrupt] == ["2"]
  assert os.listdir(tmp_path) == []


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
else:
  from test_gcs import gcs  # noqa: F401 - the module's emulator fixture (not needed by the worker)
