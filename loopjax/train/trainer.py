"""The set-up every command shares, written once: config -> mesh -> model graph -> shardings -> jitted step.

`build_trainer(cfg, mesh, optimizer, schedule)` is what `loopjax train` runs per segment of its plan,
what `loopjax compile` lowers for a TPU topology, and what tests and benchmarks time. It allocates
nothing: the state's shapes and shardings come from `jax.eval_shape`, and `init_state` creates the real
arrays directly in their shards when the driver needs a fresh state.
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from loopjax import checkpoint as checkpoint_lib
from loopjax import config as config_lib
from loopjax import sharding
from loopjax.model import attention, flops_per_token
from loopjax.train import gate_step as gate_lib
from loopjax.train import state as state_lib
from loopjax.train import step as step_lib
from loopjax.train.optim import learning_rate_schedule, run_optimizer

log = logging.getLogger("loopjax")


@dataclasses.dataclass(frozen=True)
class Trainer:
  """One compiled-shape configuration of a run. No train state is allocated."""
  cfg: object  # the (derived, single-phase) config its step runs with
  mesh: Mesh
  optimizer: optax.GradientTransformation  # the LM's (Stage I) optimizer
  gate_optimizer: optax.GradientTransformation | None  # the exit gate's own, in a gate phase (Stage II)
  objective: str  # "lm" (Stage I) or "gate" (Stage II)
  abstract_state: state_lib.TrainState  # ShapeDtypeStructs carrying the target shardings
  state_shardings: state_lib.TrainState
  train_step: object  # jitted (state, batch) -> (state, metrics)
  flops_per_token: float  # of what the step computes: forward + backward, or forward only (gate)

  def init_state(self) -> state_lib.TrainState:
    """A fresh state, created directly in its shards (seed `train.seed`)."""
    init = _init_layout(self.cfg, self.optimizer, self.gate_optimizer, self.objective)
    with jax.set_mesh(self.mesh):
      return jax.jit(init, out_shardings=self.state_shardings)(jax.random.key(self.cfg.train.seed))

  def state_from_params(self, params: dict) -> state_lib.TrainState:
    """A step-0 state around given `params` (imported weights, already in their shards; donated) with a
    fresh optimizer state, in the state's shardings."""
    def fresh(p):
      state = state_lib.TrainState(jnp.zeros((), jnp.int32), p, self.optimizer.init(p))
      return gate_lib.enter_gate_phase(state, self.gate_optimizer) if self.objective == "gate" else state
    with jax.set_mesh(self.mesh):
      return jax.jit(fresh, out_shardings=self.state_shardings, donate_argnums=0)(params)

  def abstract_batch(self) -> dict:
    """ShapeDtypeStructs of one global batch with its sharding (ahead-of-time lowering)."""
    rows = (self.cfg.train.batch_size, self.cfg.train.seq_len)
    batch_sharding = sharding.batch_sharding(self.mesh)
    return {k: jax.ShapeDtypeStruct(rows, jnp.float32 if k == "loss_mask" else jnp.int32, sharding=batch_sharding)
            for k in step_lib.BATCH_KEYS}


def make_mesh(cfg, devices=None) -> Mesh:
  """The (data, fsdp, context, tensor) mesh `cfg.mesh` asks for over `devices` (default: all), after
  `validate`. A context group must lie within one process (each feeds whole rows): when the torus-aware
  layout spreads one over hosts, the devices are ordered by process instead; if no order can keep it
  within one process, that is a ConfigError."""
  devices = jax.devices() if devices is None else devices
  shape = config_lib.validate(cfg, len(devices))
  mesh = sharding.make_mesh(shape, devices=devices)
  if _context_spans_processes(mesh):
    mesh = sharding.process_major_mesh(shape, devices)
  if _context_spans_processes(mesh):
    raise config_lib.ConfigError(
        f"config.mesh.context: {mesh.shape['context']} devices per sequence span several processes, but each "
        "process feeds whole rows of the batch. Fix: keep mesh.context within one host's devices "
        f"({sum(d.process_index == devices[0].process_index for d in devices)} here), and scale with mesh.data / "
        "mesh.fsdp across hosts.")
  return mesh


def _context_spans_processes(mesh: Mesh) -> bool:
  groups = np.moveaxis(mesh.devices, sharding.MESH_AXES.index("context"), -1).reshape(-1, mesh.shape["context"])
  return any(len({d.process_index for d in group}) > 1 for group in groups)


def resolve_attention(cfg, platform: str, context: int | None = None):
  """`cfg` with `model.attention` made concrete for `platform` (the mesh's devices, which for an ahead-of-time
  TPU compile are not this host's) and a sequence split over `context` devices (default: `mesh.context`,
  1 where the mesh fills it in); ConfigError if that implementation cannot run there. Training batches
  always carry segment ids (on GPU: pallas_gpu)."""
  m = cfg.model
  context = context or max(cfg.mesh.context, 1)
  impl, note = attention.resolve(m.attention, platform, m.compute_dtype, documents=True, context=context)
  problem = lambda asked: attention.backend_problem(asked, platform, cfg.train.seq_len, m.attention_block_q,
                                                    m.attention_block_kv, context)
  if m.attention == "auto" and (shape_problem := problem(impl)):  # auto never fails: blocked runs everywhere
    impl, note = "blocked", f"model.attention: auto would take {impl}, but {shape_problem[1]}; using blocked"
  problems = [p for asked in dict.fromkeys(x for x in (m.attention, impl) if x != "auto")  # asked, and what runs
              if (p := problem(asked))]
  if problems:
    field, what, fix = problems[0]
    head = f"config.{field}: " + (f"{m.attention!r} on {platform}: " if field == "model.attention" else "")
    raise config_lib.ConfigError(f"{head}{what}. Fix: {fix}.")
  if note:
    log.warning("%s", note)
  resolved = cfg.copy_and_resolve_references()
  resolved.model.attention = impl
  return resolved


def _init_layout(cfg, optimizer, gate_optimizer, objective: str):
  init = state_lib.init_fn(cfg.model, optimizer)
  if objective == "gate":
    return lambda key: gate_lib.enter_gate_phase(init(key), gate_optimizer)
  return init


def build_trainer(cfg, mesh: Mesh, schedule: optax.Schedule | None = None, objective: str = "lm",
                  wrap_step=None) -> Trainer:
  """The Trainer of `cfg` (a validated single-phase config) on `mesh`.

  `schedule`: the run's LR schedule (a staged recipe's spans its phases); default: `cfg.optim`'s.
  `wrap_step(step_fn, cfg)` may wrap the pure step before it is jitted (e.g. to report more metrics).
  """
  requested, platform = cfg.model.attention, mesh.devices.flat[0].platform
  cfg = resolve_attention(cfg, platform, mesh.shape["context"])
  log.debug("attention: %s (model.attention=%s on %s, seq %d)", cfg.model.attention, requested, platform,
           cfg.train.seq_len)
  schedule = schedule or learning_rate_schedule(cfg.optim, cfg.train.steps)
  optimizer = run_optimizer(cfg, schedule)
  # Only a gate phase has one: a model kind without an exit gate (loop_residual) has nothing to build it on.
  gate_optimizer = gate_lib.make_gate_optimizer(cfg, schedule) if objective == "gate" else None
  shardings = state_lib.state_shardings(cfg.model, optimizer, mesh)
  if objective == "gate":
    abstract_params = jax.eval_shape(state_lib.init_fn(cfg.model, optimizer), jax.random.key(0)).params
    shardings = gate_lib.gate_state_shardings(shardings, gate_optimizer, abstract_params, mesh)
    step = gate_lib.make_gate_step(cfg, gate_optimizer, schedule)
  else:
    step = step_lib.make_train_step(cfg, optimizer, schedule)
  abstract = checkpoint_lib.abstract_like(
      jax.eval_shape(_init_layout(cfg, optimizer, gate_optimizer, objective), jax.random.key(0)), shardings)
  jitted = step_lib.jit_train_step(wrap_step(step, cfg) if wrap_step else step, shardings, mesh)
  flops = flops_per_token(cfg.model, cfg.train.seq_len, training=objective == "lm")
  return Trainer(cfg, mesh, optimizer, gate_optimizer, objective, abstract, shardings, jitted, flops)
