"""Stage II gate training on a (2, 2, 2) mesh: the LM frozen bit for bit, only the gate learns.

Tolerances: the LM's parameters and optimizer state must be bit-identical (tolerance 0); the gate
loss must fall by at least 10% over 30 steps on 4 fixed batches (it falls by far more).
"""

import jax
import numpy as np

from helpers import random_batch, random_params, tiny_config
from loopjax import sharding
from loopjax.train import gate_step as gate_lib
from loopjax.train import state as state_lib
from loopjax.train import step as step_lib
from loopjax.train.optim import learning_rate_schedule, run_optimizer


def test_gate_phase_freezes_the_lm_and_trains_the_gate():
  cfg = tiny_config()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  cfg.optim.lr, cfg.optim.schedule = 3e-2, "constant"
  mesh = sharding.make_mesh((2, 2, 1, 2))
  schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
  optimizer = run_optimizer(cfg, schedule)
  gate_optimizer = gate_lib.make_gate_optimizer(cfg, schedule)
  lm_shardings = state_lib.state_shardings(cfg.model, optimizer, mesh)
  # A "pretrained" LM: parameters away from init (so per-step CEs differ) and non-zero Adam moments.
  params = jax.device_put(random_params(cfg.model, seed=1), lm_shardings.params)
  lm_opt = jax.jit(lambda p: jax.tree.map(lambda x: x + 0.5, optimizer.init(p)),
                   out_shardings=lm_shardings.opt_state)(params)
  state = gate_lib.enter_gate_phase(state_lib.TrainState(jax.numpy.int32(0), params, lm_opt), gate_optimizer)
  shardings = gate_lib.gate_state_shardings(lm_shardings, gate_optimizer, params, mesh)
  state = jax.device_put(state, shardings)
  before = jax.device_get(state)
  step = step_lib.jit_train_step(gate_lib.make_gate_step(cfg, gate_optimizer, schedule), shardings, mesh)
  batches = [random_batch(cfg, seed=i, num_docs=2) for i in range(4)]
  losses = []
  with jax.set_mesh(mesh):
    for i in range(30):
      state, metrics = step(state, batches[i % 4])
      losses.append(float(metrics["loss"]))
  after = jax.device_get(state)

  for name in before.params:
    if name != gate_lib.GATE:
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32)),
                   before.params[name], after.params[name])
  jax.tree.map(np.testing.assert_array_equal, before.opt_state["lm"], after.opt_state["lm"])
  kernel_change = np.abs(after.params["exit_gate"]["kernel"] - before.params["exit_gate"]["kernel"]).max()
  assert kernel_change > 1e-3 and after.params["exit_gate"]["bias"] != before.params["exit_gate"]["bias"]
  assert int(after.opt_state["gate"][1][0].count) == 30  # the gate's own Adam took every step
  first, last = np.mean(losses[:4]), np.mean(losses[-4:])
  assert np.all(np.isfinite(losses)) and last < 0.9 * first, losses
  assert gate_lib.leave_gate_phase(state).opt_state is state.opt_state["lm"]
