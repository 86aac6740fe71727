"""Context parallelism: a (data=2, fsdp=2, context=2) mesh equals one device in loss and gradients.

The batch has several documents per row, with boundaries on both sides of the context split, so the
document mask and the per-document RoPE positions are exercised across shards. Tolerance: loss and
every gradient to 1e-5 (max |difference| / max |value| per array), float32.
"""

import importlib.util

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import random_batch, random_params, tiny_config
from loopjax import sharding
from loopjax.config import ConfigError
from loopjax.preflight import parse_topology, topology_devices
from loopjax.train import state as state_lib
from loopjax.train.driver import global_batch
from loopjax.train.step import objective
from loopjax.train.trainer import make_mesh

RTOL = 1e-5


def loss_and_grads(cfg, mesh):
  """(loss, gradients, the compiled program's text) of the Stage I objective on `mesh`."""
  params = jax.device_put(random_params(cfg.model, seed=3), _param_shardings(cfg, mesh))
  with jax.set_mesh(mesh):
    batch = global_batch(random_batch(cfg, seed=4, num_docs=3), mesh)
    compiled = jax.jit(jax.value_and_grad(lambda p, b: objective(cfg, p, b)[0])).lower(params, batch).compile()
    loss, grads = compiled(params, batch)
  return float(loss), jax.device_get(grads), compiled.as_text()


def _param_shardings(cfg, mesh):
  specs = state_lib.param_specs(cfg.model)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


@pytest.mark.parametrize("attention", ["xla", "blocked", "native"])  # native: per shard
def test_context_parallel_mesh_equals_one_device(attention):
  cfg = tiny_config(attention=attention)
  cfg.train.batch_size, cfg.train.seq_len = 4, 16
  one = loss_and_grads(cfg, sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1]))
  split = loss_and_grads(cfg, sharding.make_mesh((2, 2, 2, 1)))
  # Each device holds 1 row x 8 of the 16 positions x D 32 of the layers' activations.
  assert "f32[1,8,32]" in split[2] and "f32[1,8,32]" not in one[2]
  np.testing.assert_allclose(split[0], one[0], rtol=RTOL)
  for a, b in zip(jax.tree.leaves(one[1]), jax.tree.leaves(split[1])):
    assert np.max(np.abs(a - b)) <= RTOL * np.max(np.abs(a))


def test_activations_split_along_the_sequence_and_batches_enter_whole():
  mesh = sharding.make_mesh((2, 2, 2, 1))
  assert sharding.logical_to_spec(("batch", "seq", "act_embed")) == P(("data", "fsdp"), "context", None)
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
  assert sharding.logical_to_spec(("batch", "kv_seq", "act_heads", None)) == P(("data", "fsdp"), None, "tensor", None)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the test extra)")
def test_a_context_axis_across_hosts_is_a_start_up_error():
  """v5p:2x2x2 is 2 hosts of 4 chips: context 4 stays on a host, context 8 would split rows over hosts."""
  devices = topology_devices(parse_topology("v5p:2x2x2"))
  cfg = tiny_config()
  cfg.train.seq_len = 64
  cfg.mesh.data, cfg.mesh.context = -1, 4
  assert make_mesh(cfg, devices).shape["context"] == 4
  cfg.mesh.context = 8
  with pytest.raises(ConfigError, match=r"^config.mesh.context: 8 devices per sequence span several processes"):
    make_mesh(cfg, devices)
