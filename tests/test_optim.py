"""The optimizer restarted mid-run (a phase's optimizer reset, an upscale with moments="reset") keeps the
LR schedule where the run is: checked against an independent reference, a fresh AdamW whose schedule is
shifted by the step (its own count then starts at 0, as the reset moments do)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from loopjax.train.optim import fresh_state_at


def test_a_fresh_state_at_step_s_applies_the_schedule_at_s_not_at_0():
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=10, decay_steps=100, end_value=1e-4)
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  grads = jax.tree.map(lambda p: jnp.sin(p + 1.0), params)
  step = 37
  optimizer = optax.adamw(schedule, weight_decay=0.1)
  reference = optax.adamw(lambda count: schedule(count + step), weight_decay=0.1)
  state, ref_state = fresh_state_at(optimizer, params, jnp.int32(step)), reference.init(params)
  for _ in range(3):
    updates, state = optimizer.update(grads, state, params)
    ref_updates, ref_state = reference.update(grads, ref_state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0), updates, ref_updates)
  plain_updates, _ = optimizer.update(grads, optimizer.init(params), params)  # what a plain init would do
  assert not np.allclose(plain_updates["w"], reference.update(grads, reference.init(params), params)[0]["w"])
