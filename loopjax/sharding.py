"""The mesh, and the one table that maps logical axis names to mesh axes.

Parameters carry `logical_axes` metadata (e.g. ("layers", "embed", "heads", "head_dim")) and
activations are constrained with `constrain(x, ("batch", "seq", "embed"))`. Nothing else in loopjax
names a mesh axis: to change how the model is laid out on devices, change `LOGICAL_RULES`.

The mesh has four axes:
  data    - pure data parallelism (parameters replicated);
  fsdp    - data parallelism with parameters and optimizer state sharded (ZeRO-3 style);
  context - context (sequence) parallelism: activations are split along the sequence, and each
            attention layer all-gathers its keys and values over this axis ("kv_seq" is replicated),
            so a sequence too long for one chip's activations spreads over several. Batches enter
            split only by rows ("input_seq" is replicated); the first constraint on the embedded
            tokens splits them, which needs no communication;
  tensor  - Megatron-style tensor parallelism over heads / MLP / vocab.
Causal and document masks, and RoPE positions, come from whole-sequence arrays that XLA partitions
with the activations, so they stay exact on any context size.
"""

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")
_AXIS_TYPES = (AxisType.Auto,) * len(MESH_AXES)

# logical axis -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": "context",  # activations' sequence axis
    "input_seq": None,  # the batch as it is fed (each process feeds whole rows)
    "kv_seq": None,  # keys and values inside attention: gathered over the context axis
    "act_embed": None,  # the hidden dimension of activations
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "embed": "fsdp",  # the hidden dimension of parameters
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "norm": None,
    "positions": None,
}


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
  """A (data, fsdp, context, tensor) mesh over `devices` (default: all), with automatic sharding axes."""
  devices = jax.devices() if devices is None else devices
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {tuple(shape)} needs one size per axis {MESH_AXES}")
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {len(devices)}")
  try:
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=_AXIS_TYPES, devices=devices)
  except NotImplementedError:
    # A TPU torus whose axes no product of mesh sizes matches (fsdp=32 x context=2 on 4x4x4): split a
    # physical axis, as MaxText's allow_split_physical_axes does; the ICI ring of the split axis is shared.
    grid = mesh_utils.create_device_mesh(tuple(shape), devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=_AXIS_TYPES)


def process_major_mesh(shape: Sequence[int], devices) -> Mesh:
  """A mesh whose devices are ordered by process, then device id: the inner axes (context, tensor) then
  group the devices of one host. For a context group that the torus-aware layout of `make_mesh` spreads
  over hosts (context=4 on v5p, whose hosts hold 2x2 chips), since each process feeds whole rows."""
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  grid = np.asarray(ordered, dtype=object).reshape(tuple(shape))
  return Mesh(grid, MESH_AXES, axis_types=_AXIS_TYPES)


def logical_to_spec(logical_axes: Sequence[str | None] | None) -> P:
  """PartitionSpec for a tuple of logical axis names (None entries stay replicated)."""
  if logical_axes is None:
    return P()
  return P(*(LOGICAL_RULES[name] if name is not None else None for name in logical_axes))


def mesh_axis(logical: str) -> tuple[str | None, int]:
  """(mesh axis, its size) that a single-axis logical name maps to in the current abstract mesh; (None, 1)
  outside a mesh or where it is replicated. For code under `shard_map`, which names the axes it works over
  (the attention kernels gather keys over the "seq" axis)."""
  mesh, axis = jax.sharding.get_abstract_mesh(), LOGICAL_RULES[logical]
  if mesh.empty or axis is None:
    return None, 1
  return axis, mesh.shape[axis]


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh context (plain 1-device use)."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_specs(state: nnx.State) -> nnx.State:
  """The PartitionSpec of every variable in an NNX state, from its `logical_axes` metadata."""
  return jax.tree.map(lambda v: logical_to_spec(getattr(v, "logical_axes", None)), state, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a [batch, seq] input array: rows split over the data axes, each row whole."""
  return NamedSharding(mesh, logical_to_spec(("batch", "input_seq")))
