"""Where a run without a checkpoint takes its parameters from: `init.from_hf`, `init.from_checkpoint`, or
a fresh initialisation.

Only parameters are taken. The optimizer state starts fresh (`Trainer.state_from_params`): released
weights carry none, and another run's moments belong to its own optimisation. The parameters are
created directly in this run's shardings and param_dtype, whatever mesh or dtype their source had.
Sources are checked (`check_init`) before anything is read or written.
"""

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from loopjax.checkpoint import leaf_shapes, read_meta, restore_params
from loopjax.checkpoint.listing import pick_step
from loopjax.storage import checkpoints_dir
from loopjax.config import ConfigError
from loopjax.hf.importer import check_hf_dir, sharded_hf_params
from loopjax.train.state import model_graph

log = logging.getLogger("loopjax")


def initial_state(trainer):
  """The step-0 state of `trainer.cfg`'s run (see the module docstring)."""
  cfg = trainer.cfg
  for note in check_init(cfg):
    log.warning("%s", note)
  if cfg.init.from_hf:
    params = sharded_hf_params(cfg.init.from_hf, cfg.model, trainer.state_shardings.params)
  elif cfg.init.from_checkpoint:
    params = checkpoint_params(cfg.init.from_checkpoint, trainer)
  else:
    return trainer.init_state()
  log.info("initialised the parameters from %s", cfg.init.from_hf or cfg.init.from_checkpoint)
  return trainer.state_from_params(params)


def check_init(cfg) -> list[str]:
  """Checks cfg.init's source against cfg.model, reading no arrays; returns notes worth logging."""
  if cfg.init.from_hf:
    return check_hf_dir(cfg.init.from_hf, cfg.model)
  if cfg.init.from_checkpoint:
    _checkpoint_source(cfg.init.from_checkpoint, cfg.model)
  return []


def parse_source(spec: str) -> tuple[str, int | None]:
  """init.from_checkpoint "DIR[:STEP]" -> (checkpoints directory, step or None = the newest)."""
  directory, colon, step = spec.rpartition(":")
  if colon and step.isdigit():
    return str(checkpoints_dir(directory)), int(step)
  return str(checkpoints_dir(spec)), None


def _checkpoint_source(spec: str, model_cfg) -> tuple[str, int, dict]:
  """(directory, step, saved "shape dtype" per parameter) of a checkpoint whose shapes fit `model_cfg`."""
  directory, step = parse_source(spec)
  step, meta = read_meta(directory, pick_step(directory, step, "config.init.from_checkpoint"))
  saved = meta["shapes"]["params"]
  wanted = leaf_shapes(nnx.to_pure_dict(model_graph(model_cfg)[1]))
  differ = [f"{name}: {_shape(saved[name]) if name in saved else 'missing'} vs {_shape(text)}"
            for name, text in wanted.items() if name not in saved or _shape(saved[name]) != _shape(text)]
  if differ or len(saved) != len(wanted):
    raise ConfigError(f"config.init.from_checkpoint: step {step} in {directory} holds other parameter shapes than "
                      f"config.model asks for (saved vs config: {'; '.join(differ[:4]) or 'other parameters'}). "
                      f"Fix: set config.model to the checkpoint's (its meta/metadata holds its config)")
  return directory, step, saved


def _shape(text: str) -> str:
  """A checkpoint's meta["shapes"] entry without its dtype: '(L, D) float32' -> '(L, D)'."""
  return text.rsplit(" ", 1)[0]


def checkpoint_params(spec: str, trainer) -> dict:
  """The parameters of checkpoint `spec`, verified, in `trainer`'s shardings and param_dtype.

  They are read in their saved dtype (so the checksum can be checked) and cast on device.
  """
  directory, step, saved = _checkpoint_source(spec, trainer.cfg.model)
  target = trainer.abstract_state.params
  leaves, treedef = jax.tree.flatten(target)
  stored = [jax.ShapeDtypeStruct(x.shape, jnp.dtype(saved[name].rsplit(" ", 1)[1]), sharding=x.sharding)
            for name, x in zip(leaf_shapes(target), leaves)]
  params = restore_params(directory, treedef.unflatten(stored), step).items["params"]
  dtypes = treedef.unflatten([x.dtype for x in leaves])
  cast = jax.jit(lambda p: jax.tree.map(lambda x, dtype: x.astype(dtype), p, dtypes),
                 out_shardings=treedef.unflatten([x.sharding for x in leaves]), donate_argnums=0)
  with jax.set_mesh(trainer.mesh):
    return cast(params)
