"""Model zoo: `build_model(cfg.model, rngs)` returns the NNX module for `model.kind`.

Every model exposes the same calls:
  model.run_steps(tokens_BS, read_out, ...) -> (read_out(h_BSD, head_kernel_DV) per step, gate_logits_TBS)
  model(tokens_BS, segment_ids_BS=, positions_BS=, loop_steps=) -> LoopOutput (per-step logits)
  model.step_losses(tokens_BS, targets_BS, ...) -> (ce_TBS, gate_logits_TBS) for training
"""

import ml_collections
from flax import nnx

from loopjax.model.loop_residual import LoopResidualGPT2
from loopjax.model.heads import LoopOutput
from loopjax.model.looped import LoopLM

MODELS = {"ouro": LoopLM, "loop_residual": LoopResidualGPT2}


def build_model(model_cfg, rngs: nnx.Rngs) -> nnx.Module:
  """Instantiate `model_cfg.kind`; the config is frozen so the module's static structure is hashable."""
  frozen = ml_collections.FrozenConfigDict(model_cfg)
  return MODELS[frozen.kind](frozen, rngs=rngs)


__all__ = ["build_model", "LoopLM", "LoopResidualGPT2", "LoopOutput", "MODELS"]
