"""In-process checkpoint tests on 8 fake CPU devices: mesh-change restore, params-only restore,
NaN policies (and no NaN on disk), full and unwritable disks. Real Orbax checkpoints in tmp dirs."""

import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest
from helpers import tiny_config

from loopjax import checkpoint as ck
from loopjax import sharding
from loopjax.train import driver
from loopjax.train import state as state_lib
from loopjax.train.hooks import NonFiniteLossError
from loopjax.train.optim import run_optimizer
from loopjax.train.trainer import build_trainer, make_mesh


def _cfg(**train):
  c = tiny_config()
  c.train.steps = 6
  c.checkpoint.every_steps = 2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  for key, value in train.items():
    setattr(c.train, key, value)
  return c


def _shardings_on(cfg, mesh_shape):
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
  return state_lib.state_shardings(cfg.model, run_optimizer(cfg), mesh)


def _items(state):
  return {"params": state.params, "opt_state": state.opt_state}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A trained state saved on a (2, 2, 2) mesh, with its host copy."""
  cfg = _cfg()
  workdir = str(tmp_path_factory.mktemp("saved"))
  trainer = build_trainer(cfg, make_mesh(cfg))
  driver.train(cfg, workdir)
  directory = os.path.join(workdir, "checkpoints")
  reader = ck.Checkpointer(directory)
  restored = reader.restore(6, {"params": trainer.abstract_state.params,
                                "opt_state": trainer.abstract_state.opt_state})
  reader.close()
  return cfg, directory, jax.device_get(restored.items)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1, 1), (4, 1, 1, 2), (1, 8, 1, 1)])
def test_restore_onto_another_mesh_is_identical(saved, mesh_shape):
  cfg, directory, host = saved
  shardings = _shardings_on(cfg, mesh_shape)
  target = {"params": ck.abstract_like(host["params"], shardings.params),
            "opt_state": ck.abstract_like(host["opt_state"], shardings.opt_state)}
  reader = ck.Checkpointer(directory, read_only=True)
  restored = reader.restore(6, target)
  for a, b, t in zip(jax.tree.leaves(restored.items), jax.tree.leaves(host), jax.tree.leaves(target)):
    assert a.sharding == t.sharding
    np.testing.assert_array_equal(np.asarray(a), b)  # bitwise: tolerance 0
  assert restored.meta["phase"] == "main" and restored.meta["config"]["mesh"]["tensor"] == 2
  assert len({d.id for a in jax.tree.leaves(restored.items["params"]) for d in a.devices()}) == np.prod(mesh_shape)


def test_checkpoint_of_another_config_is_an_error_not_damage(saved):
  cfg, directory, host = saved
  other = _cfg()
  other.model.mlp_dim = 64
  shardings = _shardings_on(other, (2, 2, 1, 2))
  abstract = jax.eval_shape(state_lib.init_fn(other.model, run_optimizer(other)), jax.random.key(0))
  target = {"params": ck.abstract_like(abstract.params, shardings.params),
            "opt_state": ck.abstract_like(abstract.opt_state, shardings.opt_state)}
  reader = ck.Checkpointer(directory, read_only=True)
  with pytest.raises(ck.IncompatibleCheckpointError, match=r"step 6 .* does not fit this config.*w_down"):
    ck.restore_latest(reader, lambda step: (target, None))
  assert reader.all_steps() == [2, 4, 6]  # nothing set aside


def test_params_only_restore_as_numpy_and_sharded(saved):
  cfg, directory, host = saved
  as_numpy = ck.restore_params(directory)
  assert as_numpy.step == 6
  jax.tree.map(np.testing.assert_array_equal, as_numpy.items["params"], host["params"])
  shardings = _shardings_on(cfg, (1, 1, 1, 1))
  sharded = ck.restore_params(directory, ck.abstract_like(host["params"], shardings.params), step=4)
  assert sharded.step == 4
  assert not all(np.array_equal(a, b) for a, b in
                 zip(jax.tree.leaves(jax.device_get(sharded.items["params"])), jax.tree.leaves(host["params"])))


def _dir_bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)


def test_arrays_are_stored_uncompressed_unless_asked_and_both_restore(tmp_path):
  """Zeros (a fresh optimizer state) shrink ~1000x under zstd: on-disk bytes tell whether it ran."""
  zeros = {"params": {"w": np.zeros((512, 512), np.float32)}, "opt_state": {"mu": np.zeros(4096, np.float32)}}
  raw_bytes = 4 * (512 * 512 + 4096)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = ck.abstract_like(zeros, jax.tree.map(lambda _: one_device, zeros))
  writer = ck.Checkpointer(str(tmp_path / "now"))
  writer.save(1, zeros, meta={"phase": "main"})
  writer.close()
  assert _dir_bytes(tmp_path / "now" / "1") >= raw_bytes

  # checkpoint.compress=True, the format of earlier versions (Orbax's default, zstd on), restores the same.
  earlier = ck.Checkpointer(str(tmp_path / "compressed"), compress=True)
  earlier.save(1, zeros, meta={"phase": "main"})
  earlier.close()
  assert _dir_bytes(tmp_path / "compressed" / "1") < raw_bytes / 10
  for directory in ("now", "compressed"):
    for compress in (False, True):
      reader = ck.Checkpointer(str(tmp_path / directory), read_only=True, compress=compress)
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(reader.restore(1, target).items), zeros)


class _PoisonedIterator:
  """The real batch stream with NaN written into `loss_mask` of the batches at `bad_steps` (1-based)."""

  def __init__(self, parent, bad_steps):
    self._parent, self._bad_steps, self._served = parent, set(bad_steps), 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self._parent))
    self._served += 1
    if self._served in self._bad_steps:
      batch["loss_mask"] = np.full_like(batch["loss_mask"], np.nan)
    return batch

  def get_state(self):
    return {"parent": self._parent.get_state(), "served": self._served}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._served = state["served"]


def _saved_arrays_finite(directory):
  for step in ck.Checkpointer(directory, read_only=True).all_steps():
    arrays = ck.restore_params(directory, step=step).items["params"]
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(arrays)), step


class _PoisonedRunner(driver.Runner):
  """The driver with NaN in the batch of step 3 (its `stream` is the seam a custom data source uses)."""

  def stream(self, ph):
    return _PoisonedIterator(super().stream(ph), bad_steps={3})


def test_nan_batch_skip_policy_skips_update_and_counts(tmp_path):
  cfg = _cfg(nan_policy="skip")
  result = _PoisonedRunner(cfg, str(tmp_path)).run()
  assert result.last_metrics["nonfinite_steps"] == 1 and result.step == 6
  directory = str(tmp_path / "checkpoints")
  by_step = {s: ck.restore_params(directory, step=s).items["params"] for s in (2, 4, 6)}
  # Step 3 left the weights alone; steps 4, 5, 6 trained.
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(by_step[2]), jax.tree.leaves(by_step[4])))
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert [r["nonfinite"] for r in lines] == [0, 0, 1, 0, 0, 0]
  assert np.isnan(lines[2]["loss"]) and np.isfinite(lines[3]["loss"])
  _saved_arrays_finite(directory)


def test_nan_batch_stop_policy_raises_with_step(tmp_path):
  cfg = _cfg(nan_policy="stop")
  with pytest.raises(NonFiniteLossError, match=r"step 3: the loss or gradient norm is NaN"):
    _PoisonedRunner(cfg, str(tmp_path)).run()
  directory = str(tmp_path / "checkpoints")
  assert ck.Checkpointer(directory, read_only=True).all_steps() == [2]
  _saved_arrays_finite(directory)


def test_nan_params_are_never_checkpointed(tmp_path):
  class NanStart(driver.Runner):
    def restore(self, ckpt):
      state, tally, step, stream = super().restore(ckpt)
      poisoned = jax.tree.map(lambda x: x * np.nan if x.ndim == 2 else x, state.params)
      return state._replace(params=poisoned), tally, step, stream

  cfg = _cfg(nan_policy="skip")
  with pytest.raises(ck.NonFiniteStateError, match="refusing to save the checkpoint of step 2: 'params' holds NaN"):
    NanStart(cfg, str(tmp_path)).run()
  assert ck.Checkpointer(str(tmp_path / "checkpoints"), read_only=True).all_steps() == []


def test_unwritable_checkpoint_directory_is_a_clear_error(tmp_path):
  (tmp_path / "checkpoints").write_text("a file where the directory should be")
  with pytest.raises(ck.CheckpointError, match="Fix: point --workdir at a writable directory"):
    ck.Checkpointer(str(tmp_path / "checkpoints"))


@pytest.fixture
def small_disk(tmp_path):
  """A 1.5 MiB tmpfs: room for one checkpoint of the tiny model, not three. Needs mount rights."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
  yield str(mount)
  subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_is_a_clear_error_and_keeps_earlier_checkpoints(saved, small_disk):
  cfg, _, host = saved
  shardings = _shardings_on(cfg, (2, 2, 1, 2))
  state = jax.device_put(host, {"params": shardings.params, "opt_state": shardings.opt_state})
  directory = os.path.join(small_disk, "checkpoints")
  writer = ck.Checkpointer(directory, keep=10)
  with pytest.raises(ck.CheckpointWriteError, match=r"saving the checkpoint of step \d to .*No space left on device.*"
                                                     r"Earlier checkpoints are untouched.*Fix: free space on that disk"):
    for step in range(1, 6):
      writer.save(step, state, meta={"phase": "main"})
      writer.wait()
  good = ck.Checkpointer(directory, read_only=True).all_steps()
  assert good and max(good) < 5
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  for step in good:
    restored = ck.Checkpointer(directory, read_only=True).restore(step, target)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.items), host)
  shutil.rmtree(directory, ignore_errors=True)


def test_a_resumed_run_logs_each_step_once_in_jsonl_and_tensorboard(tmp_path):
  """A run that died after logging steps its last checkpoint does not hold: they are logged again, once."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  cfg = _cfg(log_every=1)
  driver.train(cfg, str(tmp_path))
  shutil.rmtree(tmp_path / "checkpoints" / "6")  # as if the process died before saving step 6
  result = driver.train(cfg, str(tmp_path))
  assert result.step == 6
  rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  events = EventAccumulator(str(tmp_path / "tensorboard"))
  events.Reload()
  logged = [e.step for e in events.Scalars("loss")]
  assert logged == [1, 2, 3, 4, 5, 6], logged
  assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
