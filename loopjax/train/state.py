"""The train state, its shardings, and sharded initialisation.

Initialisation never builds the full model on one device: the state's shapes come from
`jax.eval_shape`, shardings from the parameters' logical axes, and the real arrays are created by
`jax.jit(init_fn(...), out_shardings=...)` (`Trainer.init_state`) so each device materialises only
its own shards.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from loopjax import sharding
from loopjax.model import build_model


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: dict  # pure nested dict of arrays (nnx.to_pure_dict layout)
  opt_state: optax.OptState


def model_graph(model_cfg):
  """(graphdef, abstract param State with logical-axis metadata), without allocating anything."""
  abstract = nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract, nnx.Param)
  return graphdef, params


def param_specs(model_cfg) -> dict:
  """PartitionSpec of every parameter (a pure dict matching `TrainState.params`)."""
  return nnx.to_pure_dict(sharding.param_specs(model_graph(model_cfg)[1]))


def count_params(model_cfg) -> int:
  return sum(x.size for x in jax.tree.leaves(model_graph(model_cfg)[1]))


def init_fn(model_cfg, optimizer: optax.GradientTransformation):
  """A pure function rng -> TrainState."""
  def init(rng: jax.Array) -> TrainState:
    params = nnx.to_pure_dict(nnx.state(build_model(model_cfg, nnx.Rngs(rng)), nnx.Param))
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  return init


def state_shardings(model_cfg, optimizer, mesh: Mesh) -> TrainState:
  """NamedShardings for every leaf of the train state; optimizer moments follow their parameters."""
  specs = param_specs(model_cfg)
  abstract = jax.eval_shape(init_fn(model_cfg, optimizer), jax.random.key(0))
  opt_specs = optax.tree_map_params(optimizer, lambda _, spec: spec, abstract.opt_state, specs,
                                    transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
  spec_state = TrainState(P(), specs, opt_specs)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), spec_state, is_leaf=lambda x: isinstance(x, P))
