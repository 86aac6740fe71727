"""Gradient accumulation (train.per_device_batch): the same update as the whole batch at once, less memory.

References: the same step with the whole batch in one pass (float64: to 1e-12; float32 on the 8-device
mesh: to 1e-5), with microbatches of unequal token counts, so a plain mean of microbatch means (which
would be wrong) cannot pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_config
from loopjax import sharding
from loopjax.config import ConfigError, validate
from loopjax.train import microbatch
from loopjax.train.driver import global_batch
from loopjax.train.trainer import build_trainer


def _batch(cfg, seed=0):
  batch = random_batch(cfg, seed=seed, num_docs=2)
  batch["loss_mask"][: cfg.train.batch_size // 2, ::3] = 0.0  # microbatches get unequal token counts
  return batch


def _step(cfg, mesh, objective="lm"):
  trainer = build_trainer(cfg, mesh, objective=objective)
  state = trainer.init_state()
  with jax.set_mesh(mesh):
    new_state, metrics = trainer.train_step(state, global_batch(_batch(cfg), mesh))
  return new_state, jax.tree.map(np.asarray, metrics)


def _max_relative_difference(a_tree, b_tree) -> float:
  worst = 0.0
  for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30)))
  return worst


def _config(per_device_batch, dtype="float32", batch_size=8):
  cfg = tiny_config(param_dtype=dtype, compute_dtype=dtype)
  cfg.train.batch_size, cfg.train.per_device_batch = batch_size, per_device_batch
  return cfg


def test_split_takes_strided_rows():
  batch = {"inputs": np.arange(12).reshape(6, 2)}
  np.testing.assert_array_equal(microbatch.split(batch, 3)["inputs"][1], [[2, 3], [8, 9]])
  assert microbatch.num_microbatches(8, 2, data_parallel=2) == 2
  assert microbatch.num_microbatches(8, 0, data_parallel=2) == 1


@pytest.mark.parametrize("objective", ["lm", "gate"])
def test_float64_accumulation_equals_one_pass(objective):
  mesh = sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1])
  with jax.enable_x64(True):
    whole_state, whole = _step(_config(0, "float64"), mesh, objective)
    micro_state, micro = _step(_config(2, "float64"), mesh, objective)  # 4 microbatches of 2 rows
  assert int(micro["microbatches"]) == 4 and int(whole["microbatches"]) == 1
  for key in ("loss", "grad_norm", "expected_ce", "ce_per_step", "exit_probs", "entropy"):
    np.testing.assert_allclose(micro[key], whole[key], rtol=1e-12, err_msg=key)
  assert _max_relative_difference(whole_state.params, micro_state.params) <= 1e-12


@pytest.mark.slow
def test_sharded_accumulation_equals_one_device():
  """(data=2, fsdp=2, tensor=2), one row per shard per microbatch (2 microbatches) vs 1 device, whole batch."""
  whole_state, whole = _step(_config(0), sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1]))
  micro_state, micro = _step(_config(1), sharding.make_mesh((2, 2, 1, 2)))
  assert int(micro["microbatches"]) == 2
  np.testing.assert_allclose(micro["loss"], whole["loss"], rtol=1e-5)
  np.testing.assert_allclose(micro["grad_norm"], whole["grad_norm"], rtol=1e-5)
  assert _max_relative_difference(whole_state.params, micro_state.params) <= 1e-5


def _temp_bytes(cfg) -> int:
  mesh = sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1])
  trainer = build_trainer(cfg, mesh)
  with jax.set_mesh(mesh):
    compiled = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch()).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_temporaries_follow_the_microbatch_not_the_batch():
  """16 rows in microbatches of 2 need far less than 16 rows at once, and about what 2 rows at once need."""
  whole, micro, two_rows = (_temp_bytes(_config(p, batch_size=b)) for p, b in ((0, 16), (2, 16), (0, 2)))
  assert micro < whole / 3, (micro, whole)
  assert micro < 1.5 * two_rows + 2**20, (micro, two_rows)


def test_per_device_batch_that_does_not_divide_is_a_config_error():
  cfg = _config(3)
  with pytest.raises(ConfigError, match=r"config.train.per_device_batch: 3 rows .* Fix: use a divisor of 8"):
    validate(cfg, 1)
  cfg.train.per_device_batch, cfg.mesh.data, cfg.mesh.fsdp = 3, 1, 4  # 2 rows per shard
  with pytest.raises(ConfigError, match=r"config.train.per_device_batch: .* Fix: use a divisor of 2"):
    validate(cfg, 4)
