"""Loss-spike skipping (`train.skip_spikes`): a step far above the run's recent losses or grad norms is not applied.

Why: a bad batch or an unlucky update can throw the loss up by nats; applying it costs thousands of steps to
recover from, or the run. MaxText (`skip_step_on_spikes`) and Levanter (`skip_bad_steps`) drop such steps.

The rule, for the loss and for the (unclipped) gradient norm alike: a step is a spike when its value lies
more than `spike_factor` robust deviations above the median of the last `spike_window` applied steps,
the deviation being 1.4826 x the median absolute deviation (a standard deviation for normal noise), at
least 1% of the median (a flat loss has none). It is judged only once the window is full. A spike's
update is dropped whole: the parameters and the optimizer state (moments, Adam's count) stay as they
were; its batch is consumed and `step` advances, as for a NaN step. `spike_max_consecutive` spikes in a
row mean the loss level itself moved (a new data mix, a broken shard): the run stops with SpikeError.

Where it lives: an optax wrapper around the run's optimizer (`guard`), whose state carries the windows
and counters, so the decision is made inside the jitted step with no host round trip. Checkpoints do
not store that state with the optimizer's arrays but in the checkpoint's metadata (`to_meta` /
`rejoin`): the saved array layout stays the same whether skipping is on or off, so it can be turned on
or off for a run that has checkpoints, and a resume continues the same windows, bit for bit.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

MAD_TO_STD = 1.4826
MIN_RELATIVE_SCALE = 0.01


class SpikeError(RuntimeError):
  """train.spike_max_consecutive steps in a row were spikes."""
  exit_code = 3  # a fault during the run (loopjax/cli/errors.py)


class SpikeGuardState(NamedTuple):
  inner: optax.OptState  # the wrapped optimizer's state, unchanged by a skipped step
  losses: jax.Array  # float32 [window]: the applied steps' losses, a ring buffer
  norms: jax.Array  # float32 [window]: their gradient norms
  applied: jax.Array  # int32: steps recorded so far (the ring position is applied % window)
  skipped: jax.Array  # int32: spikes skipped so far
  streak: jax.Array  # int32: spikes in a row, up to the latest step
  tripped: jax.Array  # int32: 1 once streak reached spike_max_consecutive (stays 1)
  last: jax.Array  # int32: 1 when the latest step was skipped


FIELDS = ("losses", "norms", "applied", "skipped", "streak", "tripped", "last")  # all but `inner`


def _center_and_scale(window):
  median = jnp.median(window)
  scale = jnp.maximum(MAD_TO_STD * jnp.median(jnp.abs(window - median)), MIN_RELATIVE_SCALE * jnp.abs(median))
  return median, scale


def guard(inner: optax.GradientTransformation, train_cfg) -> optax.GradientTransformationExtraArgs:
  """`inner` that leaves out spikes; its update needs the step's loss as `value=`."""
  window, factor, limit = int(train_cfg.spike_window), float(train_cfg.spike_factor), int(train_cfg.spike_max_consecutive)
  inner = optax.with_extra_args_support(inner)

  def init(params):
    zeros, count = jnp.zeros((window,), jnp.float32), jnp.zeros((), jnp.int32)
    return SpikeGuardState(inner.init(params), zeros, zeros, count, count, count, count, count)

  def update(updates, state: SpikeGuardState, params=None, *, value, **extra):
    norm = optax.tree.norm(updates).astype(jnp.float32)
    loss = jnp.asarray(value, jnp.float32)
    finite = jnp.isfinite(loss) & jnp.isfinite(norm)  # a NaN step is the step's NaN guard's business
    spike = jnp.zeros((), bool)
    for x, past in ((loss, state.losses), (norm, state.norms)):
      median, scale = _center_and_scale(past)
      spike |= x > median + factor * scale
    spike &= finite & (state.applied >= window)
    new_updates, new_inner = inner.update(updates, state.inner, params, value=value, **extra)
    keep_old = lambda new, old: jnp.where(spike, old, new)
    record = finite & ~spike
    at = state.applied % window
    streak = jnp.where(spike, state.streak + 1, 0)
    kept_updates = jax.tree.map(lambda u: jnp.where(spike, jnp.zeros_like(u), u), new_updates)
    return kept_updates, SpikeGuardState(
        jax.tree.map(keep_old, new_inner, state.inner),
        jnp.where(record, state.losses.at[at].set(loss), state.losses),
        jnp.where(record, state.norms.at[at].set(norm), state.norms),
        state.applied + record.astype(jnp.int32), state.skipped + spike.astype(jnp.int32), streak,
        jnp.maximum(state.tripped, (streak >= limit).astype(jnp.int32)), spike.astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init, update)


def _is_guard(x) -> bool:
  return isinstance(x, SpikeGuardState)


def _guards(opt_state) -> list[SpikeGuardState]:
  return [x for x in jax.tree.leaves(opt_state, is_leaf=_is_guard) if _is_guard(x)]


def step_metrics(opt_state) -> dict:
  """The guard's per-step metrics (none when skipping is off): `spike_skipped` (this step), `spike_steps`
  (skipped so far) and `spike_tripped`."""
  found = _guards(opt_state)
  if not found:
    return {}
  g = found[0]
  return {"spike_skipped": g.last, "spike_steps": g.skipped, "spike_tripped": g.tripped}


def check(cfg, metrics: dict, step: int):
  """Raises SpikeError once spike_max_consecutive spikes in a row happened (host values of step_metrics)."""
  if metrics.get("spike_tripped"):
    raise SpikeError(
        f"{cfg.train.spike_max_consecutive} steps in a row were loss spikes (by step {step}; none was applied, "
        f"{int(metrics['spike_steps'])} skipped in all): the loss level itself has moved. Fix: check the data "
        "at these steps, raise --config.train.spike_factor or spike_max_consecutive, or resume from an earlier "
        "checkpoint with --config.train.skip_spikes=False")


def strip(opt_state):
  """The optimizer state without the guard's (what a checkpoint stores as arrays)."""
  return jax.tree.map(lambda x: x.inner if _is_guard(x) else x, opt_state, is_leaf=_is_guard)


def to_meta(opt_state) -> dict | None:
  """The guard's state as JSON values (float32 values round-trip exactly through Python floats)."""
  found = _guards(opt_state)
  if not found:
    return None
  host = {f: np.asarray(getattr(found[0], f).addressable_data(0)) for f in FIELDS}
  return {f: v.tolist() for f, v in host.items()}


def rejoin(target, restored, saved: dict | None):
  """`restored` (a stripped optimizer state) with the guards `target` (the trainer's abstract state, with
  its shardings) has, filled from `saved` (`to_meta` of the checkpoint) or fresh when the checkpoint has
  none or another window. Guards sit at the top of the LM optimizer's state or under a dict key."""
  if _is_guard(target):
    fresh = saved is None or len(saved["losses"]) != target.losses.shape[0]
    values = {f: np.zeros(getattr(target, f).shape, getattr(target, f).dtype) if fresh
              else np.asarray(saved[f], getattr(target, f).dtype) for f in FIELDS}
    arrays = {f: jax.make_array_from_callback(v.shape, getattr(target, f).sharding, lambda i, v=v: v[i])
              for f, v in values.items()}
    return SpikeGuardState(restored, **arrays)
  if isinstance(target, dict):
    return {k: rejoin(target[k], restored[k], saved) for k in target}
  return restored
