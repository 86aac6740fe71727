"""What a checkpoint records about its arrays so a restore can tell good data from bad: a checksum and
the (shape, dtype) of every leaf.

The checksum is the uint32 sum of every array's bit patterns. Integer sums are exact in any reduction
order, so it is identical on any mesh or device count, and it is additive, so a tool that streams one
array at a time (upscale, export) can recompute it from the parts it reads (`bits_sum`).
"""

import jax
import jax.numpy as jnp
import numpy as np


def _bits_u32(x: jax.Array) -> jax.Array:
  """The bit pattern of every element as uint32 (narrower types zero-extended)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = jnp.dtype(f"uint{x.dtype.itemsize * 8}")
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _fingerprint(tree) -> tuple[jax.Array, jax.Array]:
  """(uint32 checksum, all finite) of a pytree of arrays; the same on any sharding."""
  leaves = jax.tree.leaves(tree)
  checksum = sum((jnp.sum(_bits_u32(x), dtype=jnp.uint32) for x in leaves), jnp.uint32(0))
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                              if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.bool_(True)]))
  return checksum, finite


def fingerprint(tree) -> tuple[int, bool]:
  """(checksum, every float finite) of a pytree of (sharded) jax arrays."""
  checksum, finite = _fingerprint(tree)
  return int(checksum), bool(finite)


def bits_sum(x: np.ndarray) -> int:
  """The uint32 sum of x's bit patterns: one host array's part of a checksum."""
  bits = x.astype(np.uint32) if x.dtype == np.bool_ else x.view(f"uint{x.dtype.itemsize * 8}")
  return int(np.sum(bits, dtype=np.uint32))


def host_checksum(tree) -> int:
  """`fingerprint`'s checksum of a pytree of host numpy arrays."""
  return sum(bits_sum(np.asarray(x)) for x in jax.tree.leaves(tree)) % 2**32


def leaf_shapes(tree) -> dict:
  """Dotted leaf name -> "shape dtype" of a pytree of arrays or structs (stored in meta at save)."""
  def name(path):
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {name(path): f"{tuple(x.shape)} {np.dtype(x.dtype).name}" for path, x in leaves}


def abstract_like(tree, shardings) -> object:
  """ShapeDtypeStructs of `tree` (arrays or structs) carrying the target `shardings`: a restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
