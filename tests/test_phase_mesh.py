"""A recipe phase with its own mesh and gradient accumulation trains the same model as one without.

Reference: the same two-phase recipe on one (data=2, fsdp=2, tensor=2) mesh throughout with whole
batches. The other run moves phase b onto (fsdp=4, context=2) and accumulates 2 microbatches: the
state is resharded on entry, and every logged loss and the final parameters agree to 1e-5.
"""

import json
import os

import jax
import numpy as np
import pytest

from helpers import tiny_config
from loopjax import phases
from loopjax.checkpoint import restore_params
from loopjax.config import ConfigError
from loopjax.train.driver import check_run, train


def _recipe(mesh_b=None, per_device_batch_b=-1):
  cfg = tiny_config()
  cfg.train.steps, cfg.data.source, cfg.checkpoint.async_save = 0, "multihop", False
  cfg.model.vocab_size = 128
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  cfg.phases = (phases.phase(name="a", steps=2, batch_tokens=128),
                phases.phase(name="b", steps=2, per_device_batch=per_device_batch_b, mesh=mesh_b or {}))
  return cfg


def _rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [row for row in map(json.loads, f) if "loss" in row]


def _losses(workdir) -> list[float]:
  return [row["loss"] for row in _rows(workdir)]


def _final_params(workdir):
  return restore_params(os.path.join(workdir, "checkpoints")).items["params"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  same = str(tmp_path_factory.mktemp("same"))
  moved = str(tmp_path_factory.mktemp("moved"))
  train(_recipe(), same)
  train(_recipe({"data": 1, "fsdp": 4, "context": 2, "tensor": 1}, per_device_batch_b=1), moved)
  return same, moved


@pytest.mark.slow
def test_phase_on_another_mesh_with_microbatches_trains_the_same_model(runs):
  same, moved = runs
  assert len(_losses(same)) == 4
  np.testing.assert_allclose(_losses(moved), _losses(same), rtol=1e-5)
  assert [row["microbatches"] for row in _rows(moved)] == [1, 1, 2, 2]
  for a, b in zip(jax.tree.leaves(_final_params(same)), jax.tree.leaves(_final_params(moved))):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))


def test_a_phase_mesh_that_does_not_fit_the_devices_names_the_phase():
  with pytest.raises(ConfigError, match=r"^config.phases\[1\] \('b'\): in this phase config.mesh: "
                                        r"data\*fsdp\*context\*tensor = 32 .*Fix: "):
    check_run(_recipe({"data": 2, "fsdp": 4, "context": 2}), 8)
  with pytest.raises(ConfigError, match=r"^config.phases\[1\] \('b'\): in this phase config.train.per_device_batch"):
    check_run(_recipe(per_device_batch_b=3), 8)
