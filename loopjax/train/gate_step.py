"""Stage II (SPEC section 2): train the exit gate alone, with the LM frozen.

The step differentiates the Stage II loss with respect to `params["exit_gate"]` only; every other
parameter enters the forward pass as a constant. That is a masked update in the strongest form:

  * the LM receives no update at all (not a zero update: `p + 0.0` would turn -0.0 into +0.0), so its
    parameters leave the step bit-identical;
  * no gradient is computed for the LM (the gate reads the final hidden state, which does not depend on
    the gate, so the backward pass never enters the loop);
  * the LM's Stage I optimizer state is carried through untouched, so a later LM phase can resume it.

The gate gets its own AdamW (`make_gate_optimizer`: the same hyperparameters, LR schedule and weight-decay
mask as the LM optimizer), so in a gate phase `TrainState.opt_state` is `{"lm": <Stage I state>, "gate": <the
gate's state>}`. `enter_gate_phase` / `leave_gate_phase` convert between the two layouts.
"""

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from loopjax import exits
from loopjax.model import weight_decay_mask
from loopjax.train import microbatch
from loopjax.train.optim import make_optimizer
from loopjax.train.state import TrainState, model_graph, param_specs
from loopjax.train.step import model_losses

GATE = "exit_gate"


def make_gate_optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The exit gate's own AdamW: `cfg.optim` with the gate's part of the model's weight-decay mask."""
  return make_optimizer(cfg.optim, schedule, weight_decay_mask(cfg.model)[GATE])


def enter_gate_phase(state: TrainState, gate_optimizer) -> TrainState:
  """The Stage I state -> the gate phase's state, with a fresh optimizer state for the gate."""
  return TrainState(state.step, state.params,
                    {"lm": state.opt_state, "gate": gate_optimizer.init(state.params[GATE])})


def leave_gate_phase(state: TrainState) -> TrainState:
  """The gate phase's state -> the Stage I layout (the LM's optimizer state as it was on entry)."""
  return TrainState(state.step, state.params, state.opt_state["lm"])


def gate_state_shardings(lm_shardings: TrainState, gate_optimizer, params, mesh) -> TrainState:
  """Shardings of the gate phase's state: the LM's as they are, the gate's moments like the gate.

  `params`: the parameters (arrays or ShapeDtypeStructs), for the shapes of the gate's moments.
  """
  gate_shardings = lm_shardings.params[GATE]
  abstract = jax.eval_shape(gate_optimizer.init, params[GATE])
  gate_opt = optax.tree_map_params(gate_optimizer, lambda _, s: s, abstract, gate_shardings,
                                   transform_non_params=lambda _: NamedSharding(mesh, P()),
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(lm_shardings.step, lm_shardings.params, {"lm": lm_shardings.opt_state, "gate": gate_opt})


def make_gate_step(cfg, gate_optimizer, schedule: optax.Schedule):
  """gate_step(state, batch) -> (state, metrics) on the Stage II loss (k, gamma from cfg.objective).

  Metrics: the same names as the Stage I step (per-step CE, exit distribution, ...) with `loss` the
  Stage II loss. Like the Stage I step, a non-finite loss or gradient drops the update.
  """
  o = cfg.objective
  graphdef, _ = model_graph(cfg.model)
  gate_specs = param_specs(cfg.model)[GATE]

  def gate_step(state: TrainState, batch: dict):
    frozen = {name: jax.lax.stop_gradient(value) for name, value in state.params.items() if name != GATE}

    def loss_fn(gate_params, batch):
      ce_TBS, gate_TBS = model_losses(graphdef, {**frozen, GATE: gate_params}, batch)
      loss = exits.stage2_gate_loss(ce_TBS, gate_TBS, batch["loss_mask"], k=o.gate_k, gamma=o.gate_gamma)
      _, metrics = exits.stage1_loss(ce_TBS, gate_TBS, batch["loss_mask"], beta=o.beta)
      return loss, metrics

    gate_params, gate_opt = state.params[GATE], state.opt_state["gate"]
    n = microbatch.num_microbatches(batch["inputs"].shape[0], cfg.train.per_device_batch)
    (loss, metrics), grads = microbatch.value_and_grad(loss_fn, gate_params, batch, n, gate_specs)
    grad_norm = optax.tree.norm(grads)
    updates, new_gate_opt = gate_optimizer.update(grads, gate_opt, gate_params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_bad = lambda new, old: jnp.where(finite, new, old)
    new_gate = jax.tree.map(keep_if_bad, optax.apply_updates(gate_params, updates), gate_params)
    new_gate_opt = jax.tree.map(keep_if_bad, new_gate_opt, gate_opt)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                   tokens=jnp.sum(batch["loss_mask"]), nonfinite=1.0 - finite.astype(jnp.float32),
                   microbatches=n)
    params = {**state.params, GATE: new_gate}
    return TrainState(state.step + 1, params, {"lm": state.opt_state["lm"], "gate": new_gate_opt}), metrics

  return gate_step
