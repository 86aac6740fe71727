"""What every model kind offers, and the record of facts each kind declares about itself.

A model implements one call, `run_loop(tokens_BS, read_out, ...)`: it runs its loop and applies
`read_out(h_BSD, head_kernel_DV)` to each state it scores. `LoopedModel` builds the two calls the
rest of loopjax uses on top of it: `__call__` (per-step logits, for evaluation and import checks) and
`step_losses` (per-step CE, for training). A read-out that returns the CE keeps the [T, B, S, V]
logits from ever existing at once.

`ModelKind` gathers what code outside the model needs to know about a kind (the module, the key of
its upscalable stack, its FLOP count, its HF names), so adding a kind touches one file.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopjax.exits import exit_distribution
from loopjax.model import token_order
from loopjax.model.heads import lm_cross_entropy, lm_logits


# "auto" keeps every loop step's d CE / d logits (the whole global batch) up to this size; above it
# the head is recomputed in the backward pass, in `loss_chunk` chunks if set.
LOSS_SAVE_BYTES = 2**30


class LoopOutput(NamedTuple):
  step_logits: jax.Array  # [T, B, S, V] float32
  gate_logits: jax.Array  # [T, B, S] float32, pre-sigmoid
  exit_probs: jax.Array  # [T, B, S], p(t) of the exit distribution


class LoopedModel(nnx.Module):
  """A looped LM: subclasses set `self.cfg` (the frozen `model` config) and implement `run_loop`."""

  def run_loop(self, tokens_BS, read_out, *, segment_ids_BS=None, positions_BS=None,
               loop_steps: int | None = None, balanced: int = 1):
    """(read_out(h_BSD, head_kernel_DV) stacked over the T scored states, gate_logits_TBS). `balanced`: the
    inputs are in the load-balanced order of that many context shards (`token_order`; 1 = natural)."""
    raise NotImplementedError(f"{type(self).__name__} must implement run_loop")

  def __call__(self, tokens_BS, *, segment_ids_BS=None, positions_BS=None,
               loop_steps: int | None = None) -> LoopOutput:
    """Per-step logits, gate logits and exit probabilities (evaluation, import checks)."""
    logits_TBSV, gate_TBS = self.run_loop(tokens_BS, lm_logits, segment_ids_BS=segment_ids_BS,
                                          positions_BS=positions_BS, loop_steps=loop_steps)
    return LoopOutput(logits_TBSV, gate_TBS, exit_distribution(gate_TBS))

  def step_losses(self, tokens_BS, targets_BS, *, segment_ids_BS=None, positions_BS=None,
                  loop_steps: int | None = None):
    """(ce_TBS, gate_logits_TBS): every step's per-token next-token CE and gates.

    Each step's CE keeps d CE / d logits for the backward pass when `model.loss_remat` says so
    ("auto": when that gradient for all T steps fits in LOSS_SAVE_BYTES), else recomputes the logits.
    Under context parallelism the loop runs the tokens in the load-balanced order (`token_order`: every
    device of a context group gets the same attention work); inputs and outputs are in natural order.
    """
    save = _saves_logit_grads(self.cfg, tokens_BS.shape, loop_steps or self.cfg.loop_steps)
    shards = token_order.context_shards()
    if positions_BS is None:
      positions_BS = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1]), tokens_BS.shape)
    tokens_BS, targets_BS, segment_ids_BS, positions_BS = (
        token_order.balance(x, shards) for x in (tokens_BS, targets_BS, segment_ids_BS, positions_BS))

    def read_out(h_BSD, kernel_DV):
      return lm_cross_entropy(h_BSD, kernel_DV, targets_BS, self.cfg.loss_chunk, save_logit_grads=save)
    ce_TBS, gate_TBS = self.run_loop(tokens_BS, read_out, segment_ids_BS=segment_ids_BS, positions_BS=positions_BS,
                                     loop_steps=loop_steps, balanced=shards)
    return token_order.restore(ce_TBS, shards, axis=2), token_order.restore(gate_TBS, shards, axis=2)


def _saves_logit_grads(cfg, batch_seq: tuple[int, int], loop_steps: int) -> bool:
  """model.loss_remat: "save", "recompute", or "auto" (save when T x B x S x V fits LOSS_SAVE_BYTES)."""
  if cfg.loss_remat != "auto":
    return cfg.loss_remat == "save"
  size = loop_steps * math.prod(batch_seq) * cfg.vocab_size * jnp.dtype(cfg.compute_dtype).itemsize
  return size <= LOSS_SAVE_BYTES


@dataclasses.dataclass(frozen=True)
class HFMapping:
  """How a released HF checkpoint's tensors become loopjax params (torch keeps Linear as [out, in]).

  layer_tensors: loopjax name under the stack key -> (HF name after `layer_prefix`, layout).
  tensors: path of every other loopjax param -> (HF name, layout).
  layout(w, how, model_cfg): one HF tensor in loopjax's layout; unlayout is its inverse (export).
  model_type, architecture: config.json's "model_type" and "architectures" entry (the transformers class).
  config_fields: loopjax `model` field -> its config.json key, read on import and written on export.
  config_extras(model_cfg): the other config.json keys the released model code reads (written on export).
  auto_map: config.json's "auto_map": where transformers finds the model code (not shipped by loopjax).
  """

  layer_prefix: str  # with "{i}" for the layer index
  layer_tensors: dict[str, tuple[str, str]]
  tensors: dict[tuple[str, ...], tuple[str, str]]
  layout: Callable[[np.ndarray, str, object], np.ndarray]
  unlayout: Callable[[np.ndarray, str, object], np.ndarray]
  model_type: str
  architecture: str
  config_fields: dict[str, str]
  config_extras: Callable[[object], dict]
  auto_map: dict[str, str]


@dataclasses.dataclass(frozen=True)
class ModelKind:
  """The facts about one model kind that code outside loopjax.model relies on.

  stack_key: the params key of the looped, stacked layers that layer duplication grows.
  forward_flops(model_cfg, seq_len): matmul + causal-attention FLOPs per token of one forward pass.
  """

  name: str
  module: type[LoopedModel]
  stack_key: str
  forward_flops: Callable[[object, int], int]
  hf: HFMapping | None = None
  exit_gate: bool = True  # whether the kind has an exit gate to train in a Stage II (gate) phase

  def flops_per_token(self, model_cfg, seq_len: int, *, training: bool = True) -> float:
    """FLOPs per token; training counts forward + backward as 3 forwards (the 6N rule)."""
    return float((3 if training else 1) * self.forward_flops(model_cfg, seq_len))
