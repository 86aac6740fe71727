"""Context parallelism: a (data=2, fsdp=2, context=2) mesh equals one device in loss and gradients.

The batch has several documents per row, with boundaries on both sides of the context split, so the
document mask and the per-document RoPE positions are exercised across shards (the step runs the tokens
in the load-balanced order, `token_order`). Tolerance: loss and every gradient to 1e-5 (max
|difference| / max |value| per array), float32. The attention cores alone, split over (data 2, context
2, tensor 2): output and gradients against the float64 reference to 2e-5, each device's kernel on its
S / 2 queries.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import random_batch, random_params, tiny_config
from loopjax import sharding
from loopjax.config import ConfigError, validate
from loopjax.model import attention, token_order
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


def test_the_load_balanced_order():
  """8 positions over 2 shards: chunks of 2, device 0 holds chunks 0 and 3, device 1 chunks 1 and 2."""
  assert list(token_order.positions(8, 2)) == [0, 1, 6, 7, 2, 3, 4, 5]
  x = jnp.arange(16).reshape(2, 8)
  assert (token_order.balance(x, 2)[0] == token_order.positions(8, 2)).all()
  assert (token_order.restore(token_order.balance(x, 2), 2) == x).all()
  assert list(token_order.piece_starts(8, 2, 4, 1)) == [2, 4]
  assert list(token_order.piece_starts(8, 2, 8, 0)) == [0, 6, 2, 4]  # one device holds every piece
  assert list(token_order.piece_starts(8, 1, 2, 3)) == [6]  # natural order, 4 devices


def test_every_device_gets_the_same_causal_work():
  """Causal pairs (query position p sees p + 1 keys) per device of a context group of 4 at seq 2048: equal
  in the balanced order; in contiguous chunks the last device has 7 times the first's."""
  S, c = 2048, 4
  work = lambda positions: (positions + 1).reshape(c, -1).sum(axis=1)
  assert len(set(work(token_order.positions(S, c)))) == 1
  contiguous = work(np.arange(S))
  assert contiguous[-1] / contiguous[0] == pytest.approx(7, rel=0.01)


def test_a_context_size_that_does_not_cut_the_sequence_into_chunks():
  cfg = tiny_config()
  cfg.train.seq_len, cfg.mesh.data, cfg.mesh.context = 20, 2, 4
  with pytest.raises(ConfigError, match=r"^config\.mesh\.context: 2 x 4 does not divide train\.seq_len=20\. "
                                        r"Fix: [^\n]*\.$"):
    validate(cfg, 8)


def _core_inputs(B=2, S=512, N=4, K=2, H=32):
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in [(B, S, N, H), (B, S, K, H), (B, S, K, H)])
  seg = np.ones((B, S), np.int32)
  seg[0, 200:300], seg[0, 480:] = 2, 0  # documents across the chunks' borders, then padding
  seg[1, 100:] = 2
  return q, k, v, seg


@pytest.mark.parametrize("impl", ["xla", "blocked", "native", "splash"])
def test_each_device_attends_with_its_own_queries(impl):
  """(data 2, context 2, tensor 2), the tokens in the load-balanced order: out and d(q, k, v) of the core
  equal the natural-order float64 reference to 2e-5; each device holds q, k, v and out for its 256 of the
  512 positions and no array of all of q (splash: in Pallas interpret mode, its q_seq_shards path)."""
  q, k, v, seg = _core_inputs()
  weights = np.sin(np.arange(q.size, dtype=np.float32)).reshape(q.shape)
  with jax.enable_x64():
    ref = lambda q, k, v: attention.float64_attention(q, k, v, attention.attention_mask(jnp.asarray(seg)))
    loss64 = lambda q, k, v: jnp.sum(ref(q, k, v) * weights)
    want = [np.asarray(ref(*(jnp.asarray(x, jnp.float64) for x in (q, k, v))))]
    want += [np.asarray(g) for g in jax.grad(loss64, (0, 1, 2))(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))]
  bal = lambda x: np.asarray(token_order.balance(jnp.asarray(x), 2))
  mesh = sharding.make_mesh((2, 1, 2, 2))
  act = NamedSharding(mesh, sharding.logical_to_spec(("batch", "seq", "act_heads", None)))

  def core(q, k, v, seg):
    if impl == "splash":
      return attention.splash(q, k, v, seg, 128, 128, balanced=2, interpret=True)
    return attention.core(q, k, v, attention.Mask(seg, impl, 64, 64, balanced=2), "float32")

  def loss(q, k, v, seg, w):
    out = core(q, k, v, seg)
    return jnp.sum(out * w), out

  with jax.set_mesh(mesh):
    args = [jax.device_put(bal(x), act) for x in (q, k, v)]
    args += [jax.device_put(bal(seg), NamedSharding(mesh, P("data", None))), jax.device_put(bal(weights), act)]
    compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True)).lower(*args).compile()
    (_, out), grads = compiled(*args)
  got = [np.asarray(token_order.restore(jnp.asarray(x), 2), np.float64) for x in (out, *grads)]
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert np.abs(a - b).max() <= 2e-5 * np.abs(b).max(), (name, np.abs(a - b).max() / np.abs(b).max())
  text = compiled.as_text()
  assert "f32[1,256,2,32]" in text and "f32[1,512,2,32]" not in text  # [rows, positions, heads, H] per device
