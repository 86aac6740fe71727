"""A train step on a (data=2, fsdp=2, tensor=2) mesh equals the same step on one device."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import random_batch, tiny_config
from loopjax import sharding
from loopjax.train import state as state_lib
from loopjax.train.driver import global_batch
from loopjax.train.optim import run_optimizer
from loopjax.train.trainer import build_trainer

RTOL = 1e-5  # max |difference| / max |value| per array


def run_steps(cfg, mesh, num_steps=2):
  trainer = build_trainer(cfg, mesh)
  state, step = trainer.init_state(), trainer.train_step
  losses = []
  with jax.set_mesh(mesh):
    for i in range(num_steps):
      state, metrics = step(state, global_batch(random_batch(cfg, seed=i, num_docs=2), mesh))
      losses.append(float(metrics["loss"]))
  return state, losses


@pytest.fixture(scope="module")
def runs():
  cfg = tiny_config()
  one = run_steps(cfg, sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1]))
  eight = run_steps(cfg, sharding.make_mesh((2, 2, 1, 2)))
  return one, eight


def test_same_losses_and_parameters(runs):
  (state1, losses1), (state8, losses8) = runs
  np.testing.assert_allclose(losses8, losses1, rtol=RTOL)
  for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state8.params)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= RTOL * np.max(np.abs(a))
  assert int(state8.step) == 2


def test_parameters_are_sharded_as_the_rules_say(runs):
  _, (state8, _) = runs
  params = state8.params
  wq = params["stack"]["wq"]  # [L, D, N, H] with logical axes (layers, embed, heads, head_dim)
  assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
  L, D, N, H = wq.shape
  assert {s.data.shape for s in wq.addressable_shards} == {(L, D // 2, N // 2, H)}
  assert params["embed"].sharding.spec == P("tensor", "fsdp")
  assert params["lm_head"].sharding.spec == P("fsdp", "tensor")
  assert params["stack"]["w_down"].sharding.spec == P(None, "tensor", "fsdp")
  assert params["final_norm"].sharding.spec == P(None)
  # Adam's moments follow their parameters.
  mu = state8.opt_state[1][0].mu
  assert mu["stack"]["wq"].sharding.spec == wq.sharding.spec


def test_data_parallel_only_mesh_replicates_parameters():
  mesh = sharding.make_mesh((8, 1, 1, 1))
  shardings = state_lib.state_shardings(tiny_config().model, run_optimizer(tiny_config()), mesh)
  assert shardings.params["stack"]["wq"].is_fully_replicated
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
