"""Layer duplication: exact copies under every mapping, in memory on a mesh and checkpoint to checkpoint.

Exactness is bitwise (tolerance 0): duplication copies arrays, it computes nothing.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import random_batch, tiny_config
from loopjax import checkpoint as checkpoint_lib
from loopjax.train.optim import fresh_state_at
from loopjax import sharding, upscale
from loopjax.train import state as state_lib
from loopjax.train.trainer import build_trainer

LOOPJAX = os.path.join(os.path.dirname(sys.executable), "loopjax")


def test_layer_index_mappings_and_errors():
  np.testing.assert_array_equal(upscale.layer_index(3, 6, "interleave"), [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(upscale.layer_index(3, 6, "stack"), [0, 1, 2, 0, 1, 2])
  np.testing.assert_array_equal(upscale.layer_index(3, 4, "2,0,1,1"), [2, 0, 1, 1])
  for old, new, mapping, problem in [(3, 5, "interleave", "multiple"), (3, 4, "0,1,2", "4 source layers"),
                                     (3, 2, "0,3", "layers 0..2"), (3, 6, "sideways", "neither")]:
    with pytest.raises(ValueError, match=problem):
      upscale.layer_index(old, new, mapping)


def _mesh_cfg(cfg, shape):
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.context, cfg.mesh.tensor = shape
  return cfg


def trained_state(cfg, mesh, steps: int = 2):
  """A state after `steps` AdamW steps (so moments and counts are not zero), and its optimizer."""
  trainer = build_trainer(cfg, mesh)
  state, optimizer, train_step = trainer.init_state(), trainer.optimizer, trainer.train_step
  losses = []
  with jax.set_mesh(mesh):
    for i in range(steps):
      state, metrics = train_step(state, random_batch(cfg, seed=i))
      losses.append(float(metrics["loss"]))
  return state, optimizer, losses


@pytest.fixture(scope="module")
def trained():
  """(config, state, optimizer) after 2 steps on a (2, 2, 2) mesh; shared (nothing here donates it)."""
  cfg = _mesh_cfg(tiny_config(), (2, 2, 1, 2))
  cfg.optim.lr = 1e-2
  state, optimizer, _ = trained_state(cfg, sharding.make_mesh((2, 2, 1, 2)))
  return cfg, state, optimizer


def assert_upscaled(old, new, index, moments: str, optimizer):
  """Every layer array of `new` is the `index` rows of `old`; everything else is unchanged."""
  old_np, new_np = jax.device_get(old), jax.device_get(new)
  checked = 0
  trees = [(old_np.params, new_np.params)]
  if moments == "duplicate":
    trees.append((old_np.opt_state, new_np.opt_state))
  for old_tree, new_tree in trees:
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(old_tree), jax.tree.leaves(new_tree)):
      names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
      expected = a[index] if upscale.is_layer_array(names, "stack") else a
      np.testing.assert_array_equal(b, expected, err_msg="/".join(names))
      checked += upscale.is_layer_array(names, "stack")
  assert checked >= 11 * len(trees)  # the 11 sandwich-layer arrays (and their moments) were re-indexed
  if moments == "reset":
    fresh = jax.device_get(fresh_state_at(optimizer, new_np.params, new_np.step))  # the LR schedule keeps its step
    jax.tree.map(np.testing.assert_array_equal, new_np.opt_state, fresh)


@pytest.mark.parametrize("mapping,layers,moments", [("interleave", 4, "duplicate"), ("stack", 6, "duplicate"),
                                                    ("1,0,1", 3, "reset")])
def test_upscale_state_on_mesh_is_exact_and_sharded(trained, mapping, layers, moments):
  _, state, optimizer = trained
  mesh = sharding.make_mesh((2, 2, 1, 2))
  before = jax.device_get(state)
  index = upscale.layer_index(2, layers, mapping)
  new_cfg = _mesh_cfg(tiny_config(num_layers=layers), (2, 2, 1, 2))
  shardings = state_lib.state_shardings(new_cfg.model, optimizer, mesh)
  new = upscale.upscale_state(state, index, stack_key="stack", moments=moments, optimizer=optimizer,
                              shardings=shardings)
  assert_upscaled(before, new, index, moments, optimizer)
  for leaf, want in zip(jax.tree.leaves(new), jax.tree.leaves(shardings)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)


@pytest.mark.slow
def test_upscaled_model_trains_on(trained):
  """After 2 -> 4 layers (duplicated moments) the training continues and its loss keeps falling."""
  _, state, optimizer = trained
  mesh = sharding.make_mesh((2, 2, 1, 2))
  new_cfg = _mesh_cfg(tiny_config(num_layers=4), (2, 2, 1, 2))
  new_cfg.optim.lr = 1e-2
  trainer = build_trainer(new_cfg, mesh)
  state = upscale.upscale_state(state, upscale.layer_index(2, 4, "interleave"), stack_key="stack",
                                moments="duplicate", optimizer=optimizer, shardings=trainer.state_shardings)
  train_step = trainer.train_step
  batch = random_batch(new_cfg, seed=7)  # one batch, repeated: the loss on it must fall
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(6):
      state, metrics = train_step(state, batch)
      losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses


def _save(state, directory, cfg, step=5):
  ckpt = checkpoint_lib.Checkpointer(directory, async_save=False)
  ckpt.save(step, {"params": state.params, "opt_state": state.opt_state},
            meta={"phase": "1a", "config": json.loads(cfg.to_json()), "nonfinite_steps": 0,
                  "first_nonfinite_step": 0})
  ckpt.close()


def test_cli_upscale_saved_on_222_restored_on_another_mesh(tmp_path, trained):
  """Two upscales of one checkpoint: interleave with duplicated moments, an index list with reset ones."""
  cfg, state, optimizer = trained
  before = jax.device_get(state)
  src = str(tmp_path / "a" / "checkpoints")
  _save(state, src, cfg)
  other = (1, 4, 1, 2)  # restored on a different mesh; Checkpointer.restore verifies the new checksums
  mesh = sharding.make_mesh(other)
  for i, (mapping, layers, moments) in enumerate([("interleave", 4, "duplicate"), ("0,1,1,0,0", 5, "reset")]):
    dst = str(tmp_path / f"b{i}" / "checkpoints")
    out = subprocess.run([LOOPJAX, "upscale", "--from", src, "--to", dst, "--layers", str(layers),
                          "--mapping", mapping, "--moments", moments], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(os.listdir(dst)) == ["5"]  # the temporary directory was renamed, nothing else left
    new_cfg = _mesh_cfg(tiny_config(num_layers=layers), other)
    shardings = state_lib.state_shardings(new_cfg.model, optimizer, mesh)
    abstract = checkpoint_lib.abstract_like(
        jax.eval_shape(state_lib.init_fn(new_cfg.model, optimizer), jax.random.key(0)), shardings)
    ckpt = checkpoint_lib.Checkpointer(dst, read_only=True)
    restored = ckpt.restore(5, {"params": abstract.params, "opt_state": abstract.opt_state})
    ckpt.close()
    assert restored.meta["config"]["model"]["num_layers"] == layers
    new = state_lib.TrainState(before.step, restored.items["params"], restored.items["opt_state"])
    assert_upscaled(before, new, upscale.layer_index(2, layers, mapping), moments, optimizer)
    assert restored.items["params"]["stack"]["wq"].sharding.is_equivalent_to(shardings.params["stack"]["wq"], 4)


def test_cli_upscale_refuses_a_bad_layer_count(tmp_path, trained):
  cfg, state, _ = trained
  src = str(tmp_path / "a" / "checkpoints")
  _save(state, src, cfg)
  out = subprocess.run([LOOPJAX, "upscale", "--from", src, "--to", str(tmp_path / "b"), "--layers", "3"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and "multiple of the old one" in out.stderr, out.stdout + out.stderr
  assert not os.path.exists(tmp_path / "b")
