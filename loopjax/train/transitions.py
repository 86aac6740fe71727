"""What happens to the train state between the phases of a staged recipe (SPEC section 3).

On entry to a phase, in order: move the state onto the phase's mesh (when its `mesh` differs), leave a
gate phase (back to the LM optimizer state), upscale the stack (layer duplication, `loopjax.upscale`),
reset the optimizer, enter a gate phase. Each runs under
`jax.jit` with the new layout's shardings, so no host ever holds the model.
"""

import jax
from jax.sharding import NamedSharding

from loopjax import upscale
from loopjax.model import model_kind
from loopjax.train import gate_step as gate_lib
from loopjax.train import optim
from loopjax.train import state as state_lib


def onto_mesh(state, mesh):
  """`state` with every array resharded to the same PartitionSpec on `mesh` (a no-op when it is already there).

  A phase may change the mesh shape (say fsdp=64 -> fsdp=32 x context=2); the logical axes of the
  parameters, hence their specs, stay, so each array keeps its spec over the new mesh's axes.
  """
  def move(x):
    if not isinstance(x.sharding, NamedSharding) or x.sharding.mesh == mesh:
      return x
    return jax.device_put(x, NamedSharding(mesh, x.sharding.spec))
  return jax.tree.map(move, state)


def enter_phase(ph, previous, state, trainer):
  """The state phase `ph` starts from, given the one `previous` (the phase before, or None) left.

  `trainer` is the Trainer of `ph`'s first segment: its model, optimizers and shardings.
  """
  spec, optimizer = ph.spec, trainer.optimizer
  state = onto_mesh(state, trainer.mesh)
  previous_gate = previous is not None and previous.spec.objective == "gate"
  if spec.objective == "gate" and previous_gate and spec.optimizer_on_entry == "keep":
    return state
  if previous_gate:
    state = gate_lib.leave_gate_phase(state)
  lm_shardings = state_lib.state_shardings(trainer.cfg.model, optimizer, trainer.mesh)
  if spec.upscale.layers:
    index = upscale.layer_index(ph.layers_before, spec.upscale.layers, spec.upscale.mapping)
    state = upscale.upscale_state(state, index, stack_key=model_kind(trainer.cfg.model.kind).stack_key,
                                  moments=spec.upscale.moments, optimizer=optimizer, shardings=lm_shardings)
  if spec.optimizer_on_entry == "reset" and spec.objective == "lm":
    state = jax.jit(lambda s: state_lib.TrainState(s.step, s.params, optim.fresh_state_at(optimizer, s.params, s.step)),
                    out_shardings=lm_shardings)(state)
  if spec.objective == "gate":
    state = jax.jit(lambda s: gate_lib.enter_gate_phase(s, trainer.gate_optimizer),
                    out_shardings=trainer.state_shardings)(state)
  return state
