"""Model zoo: each kind declares its facts once, in its own file, as a `ModelKind` (see base.py).

Every model exposes the same calls (`LoopedModel`):
  model.run_loop(tokens_BS, read_out, ...) -> (read_out(h_BSD, head_kernel_DV) per scored state, gate_logits_TBS)
  model(tokens_BS, segment_ids_BS=, positions_BS=, loop_steps=) -> LoopOutput (per-step logits)
  model.step_losses(tokens_BS, targets_BS, ...) -> (ce_TBS, gate_logits_TBS) for training
"""

import jax
import ml_collections
from flax import nnx

from loopjax.model import loop_residual, ouro
from loopjax.model.base import HFMapping, LoopedModel, LoopOutput, ModelKind
from loopjax.model.loop_residual import LoopResidualGPT2
from loopjax.model.ouro import LoopLM

KINDS = {kind.name: kind for kind in (ouro.KIND, loop_residual.KIND)}
MODEL_KINDS = tuple(KINDS)


def model_kind(name: str) -> ModelKind:
  """The kind called `name` (a config's `model.kind`)."""
  if name not in KINDS:
    raise ValueError(f"unknown model kind {name!r}; known kinds: {', '.join(MODEL_KINDS)}")
  return KINDS[name]


def build_model(model_cfg, rngs: nnx.Rngs) -> LoopedModel:
  """Instantiate `model_cfg.kind`; the config is frozen so the module's static structure is hashable."""
  frozen = ml_collections.FrozenConfigDict(model_cfg)
  return model_kind(frozen.kind).module(frozen, rngs=rngs)


def weight_decay_mask(model_cfg) -> dict:
  """True where AdamW decays: a pure dict shaped like `nnx.to_pure_dict` of the params.

  Read from each parameter's `weight_decay` metadata (its ParamSpec) on an abstract model, so
  nothing is allocated and no rule guesses from parameter names.
  """
  abstract = nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  flags = jax.tree.map(lambda v: v.weight_decay, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(flags)


def flops_per_token(model_cfg, seq_len: int, *, training: bool = True) -> float:
  """FLOPs per token of `model_cfg.kind` (loop-aware; training = forward + backward = 3 forwards)."""
  return model_kind(model_cfg.kind).flops_per_token(model_cfg, seq_len, training=training)


__all__ = ["KINDS", "MODEL_KINDS", "HFMapping", "LoopedModel", "LoopLM", "LoopOutput", "LoopResidualGPT2",
           "ModelKind", "build_model", "flops_per_token", "model_kind", "weight_decay_mask"]
