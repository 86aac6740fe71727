"""The train and eval steps: pure functions of (state, batch), jitted with explicit shardings.

They know nothing of files, iterators or logging; `make_train_step` closes over the static parts
(model graph, optimizer, objective settings) and `jit_train_step` adds shardings and donation.
The model graph is always built from the config the step is made with, so a step cannot run at
another loop count, remat policy or dtype than its config says.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from loopjax import exits, sharding
from loopjax.train import microbatch, spikes
from loopjax.train.state import TrainState, model_graph, param_specs

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def model_losses(graphdef, params, batch: dict, loop_steps: int | None = None):
  """(ce_TBS, gate_logits_TBS) of the model with `params` on `batch`."""
  model = nnx.merge(graphdef, params)
  return model.step_losses(batch["inputs"], batch["targets"], segment_ids_BS=batch.get("segment_ids"),
                           positions_BS=batch.get("positions"), loop_steps=loop_steps)


def stage1_objective(cfg, ce_TBS, gate_TBS, loss_mask_BS):
  """The Stage I loss and its metrics with `cfg.objective`'s settings."""
  o = cfg.objective
  return exits.stage1_loss(ce_TBS, gate_TBS, loss_mask_BS, beta=o.beta, prior=o.prior,
                           geometric_lambda=o.geometric_lambda, lm_weights=o.lm_weights)


def objective(cfg, params, batch: dict):
  """The Stage I loss and its metrics of the model `cfg.model` describes, with `params`, on `batch`."""
  ce_TBS, gate_TBS = model_losses(model_graph(cfg.model)[0], params, batch)
  return stage1_objective(cfg, ce_TBS, gate_TBS, batch["loss_mask"])


def make_train_step(cfg, optimizer: optax.GradientTransformation, schedule: optax.Schedule):
  """train_step(state, batch) -> (state, metrics): one AdamW update on the Stage I objective.

  NaN guard: when the loss or the gradient norm is NaN/Inf the update is dropped (params and
  opt_state stay as they were, `step` still advances past the batch) and `metrics["nonfinite"]` is 1.
  One bad batch then cannot poison the weights, whatever `train.nan_policy` tells the loop to do.
  With `train.skip_spikes` the optimizer itself drops a spike's update (`loopjax.train.spikes`).
  `schedule` is the optimizer's LR schedule (logged as `lr`). With `train.per_device_batch` the
  gradient is accumulated over microbatches (`loopjax.train.microbatch`); the update is the same.
  """
  graphdef, _ = model_graph(cfg.model)
  specs = param_specs(cfg.model)

  def loss_fn(params, batch):
    ce_TBS, gate_TBS = model_losses(graphdef, params, batch)
    return stage1_objective(cfg, ce_TBS, gate_TBS, batch["loss_mask"])

  def train_step(state: TrainState, batch: dict):
    n = microbatch.num_microbatches(batch["inputs"].shape[0], cfg.train.per_device_batch)
    (loss, metrics), grads = microbatch.value_and_grad(loss_fn, state.params, batch, n, specs)
    grad_norm = optax.tree.norm(grads)
    with jax.named_scope("optimizer"):
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params, value=loss)  # value: spikes.guard
      params = optax.apply_updates(state.params, updates)
    spike_metrics = spikes.step_metrics(opt_state)  # before the NaN guard, which would restore the last step's
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_bad = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep_if_bad, params, state.params)
    opt_state = jax.tree.map(keep_if_bad, opt_state, state.opt_state)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                   tokens=jnp.sum(batch["loss_mask"]), nonfinite=1.0 - finite.astype(jnp.float32),
                   microbatches=n, **spike_metrics)
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def jit_train_step(train_step, state_shardings: TrainState, mesh: Mesh):
  """jit with the state's shardings in and out, the batch sharded on its batch axes, state donated.

  Call (and lower) the result inside `jax.set_mesh(mesh)` so activation constraints see the mesh.
  """
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in BATCH_KEYS}
  return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))
