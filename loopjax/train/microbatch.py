"""Gradient accumulation: one optimizer step over its batch in microbatches, under one `lax.scan`.

Why: Ouro's batches are 8M tokens, i.e. 2,048 sequences of 4K or 128 of 64K. On a v5p-128 (64 chips)
that is 32 sequences of 4K per chip, whose activations no chip holds at once; memory must scale with
the rows a chip runs *at once*, not with the global batch. `train.per_device_batch` sets that: each
data-parallel shard (one index of mesh.data x mesh.fsdp; the chips along context and tensor share its
rows) runs that many rows per microbatch, and the step takes

    num_microbatches = batch_size / (per_device_batch x data x fsdp)

microbatches, summing their gradients in (at least) float32, sharded like the parameters.

The losses are means over loss-masked tokens. With N_m the tokens of microbatch m and N = sum_m N_m,

    loss = sum_m (N_m / N) loss_m,     grad = sum_m (N_m / N) grad_m

which is the whole batch's loss and gradient (exact up to the order of float additions), whatever the
microbatches' token counts are. The metrics the objectives report are token means too and are
accumulated the same way.
"""

import jax
import jax.numpy as jnp

from loopjax.sharding import constrain


def num_microbatches(rows: int, per_device_batch: int, data_parallel: int | None = None) -> int:
  """Microbatches of a `rows`-row batch (1 = no split; per_device_batch 0 = the whole batch at once).

  `data_parallel`: mesh.data x mesh.fsdp; default: read off the mesh being traced under (1 outside one).
  `config.validate` has checked that the division is exact.
  """
  if data_parallel is None:
    mesh = jax.sharding.get_abstract_mesh()
    data_parallel = 1 if mesh.empty else mesh.shape["data"] * mesh.shape["fsdp"]
  return max(rows // (per_device_batch * data_parallel), 1) if per_device_batch else 1


def split(batch: dict, n: int) -> dict:
  """[B, ...] -> [n, B / n, ...]; microbatch m takes rows m, m + n, m + 2n, ...

  Strided rows, not contiguous blocks: the batch arrives split over the data-parallel shards in
  contiguous blocks of rows, so every microbatch keeps rows on every shard and the split needs no
  communication.
  """
  return {k: jnp.swapaxes(v.reshape(v.shape[0] // n, n, *v.shape[1:]), 0, 1) for k, v in batch.items()}


def _accumulator(x: jax.Array) -> jax.Array:
  return jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32))


def value_and_grad(loss_fn, params, batch: dict, n: int, param_specs=None):
  """((loss, metrics), grads) of `loss_fn(params, batch) -> (token-mean loss, token-mean metrics)` over
  the whole batch, computed `n` microbatches at a time (n = 1: one pass, as jax.value_and_grad).

  `param_specs`: PartitionSpecs of `params`, which the gradient accumulator is constrained to (inside
  a mesh), so the running sum is held sharded like the parameters.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if n == 1:
    return grad_fn(params, batch)
  micro = split(batch, n)
  shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda v: v[0], micro))
  count = lambda mask: jnp.sum(mask.astype(_accumulator(shapes[0][0]).dtype))  # exact in float64 checks
  total = jnp.maximum(count(batch["loss_mask"]), 1.0)

  def body(acc, mb):
    mb = {k: constrain(v, ("batch", "input_seq")) for k, v in mb.items()}
    (loss, metrics), grads = grad_fn(params, mb)
    weight = count(mb["loss_mask"]) / total
    new = jax.tree.map(lambda a, x: a + weight * x.astype(a.dtype), acc, ((loss, metrics), grads))
    if param_specs is not None and not jax.sharding.get_abstract_mesh().empty:
      new = (new[0], jax.lax.with_sharding_constraint(new[1], param_specs))
    return new, None

  acc, _ = jax.lax.scan(body, jax.tree.map(_accumulator, shapes), micro)
  (loss, metrics), grads = acc
  cast = lambda a, like: a.astype(like.dtype)
  return (cast(loss, shapes[0][0]), jax.tree.map(cast, metrics, shapes[0][1])), jax.tree.map(cast, grads, params)
