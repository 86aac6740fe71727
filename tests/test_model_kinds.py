"""Each model kind's facts (loopjax.model.KINDS) against values listed and computed by hand."""

import jax
import numpy as np
import pytest

from helpers import tiny_config
from loopjax.model import KINDS, MODEL_KINDS, flops_per_token, model_kind, weight_decay_mask
from loopjax.train.state import model_graph

OURO_LAYER_DECAY = {"wq": True, "wk": True, "wv": True, "wo": True, "w_gate": True, "w_up": True,
                    "w_down": True, "norm_attn_in": False, "norm_attn_out": False, "norm_mlp_in": False,
                    "norm_mlp_out": False}
GPT2_LAYER_DECAY = {"wq": True, "wk": True, "wv": True, "wo": True, "w_fc": True, "w_proj": True,
                    "bq": False, "bk": False, "bv": False, "bo": False, "b_fc": False, "b_proj": False,
                    "ln1_scale": False, "ln1_bias": False, "ln2_scale": False, "ln2_bias": False}


def loop_residual_config(**overrides):
  """Loop-Residual with a prelude and a coda; N H = D = 32, as its FLOP count assumes."""
  return tiny_config(kind="loop_residual", num_kv_heads=4, prelude_layers=1, coda_layers=1, **overrides)


def test_kinds_are_named_by_their_config_kind():
  assert MODEL_KINDS == ("ouro", "loop_residual")
  assert all(model_kind(name).name == name for name in KINDS)
  with pytest.raises(ValueError, match="ouro, loop_residual"):
    model_kind("gpt3")


def test_ouro_weight_decay_mask():
  """Norm scales and the gate's bias take no decay; everything else does."""
  assert weight_decay_mask(tiny_config().model) == {
      "embed": True, "stack": OURO_LAYER_DECAY, "final_norm": False, "lm_head": True,
      "exit_gate": {"kernel": True, "bias": False}}
  assert "lm_head" not in weight_decay_mask(tiny_config(tie_embeddings=True).model)


def test_loop_residual_weight_decay_mask():
  """LayerNorm scales and all biases take no decay; weights and both embeddings do."""
  assert weight_decay_mask(loop_residual_config().model) == {
      "wte": True, "wpe": True, "prelude": GPT2_LAYER_DECAY, "block": GPT2_LAYER_DECAY,
      "coda": GPT2_LAYER_DECAY, "ln_f_scale": False, "ln_f_bias": False, "lm_head": True}


@pytest.mark.parametrize("cfg,stack_key", [(tiny_config(), "stack"), (loop_residual_config(), "block")])
def test_stack_key_holds_the_looped_layers(cfg, stack_key):
  """The stack key names the [L, ...] arrays that layer duplication grows."""
  assert model_kind(cfg.model.kind).stack_key == stack_key
  stack = model_graph(cfg.model)[1][stack_key]
  assert {leaf.shape[0] for leaf in jax.tree.leaves(stack)} == {cfg.model.num_layers}


@pytest.mark.parametrize("cfg,forward", [
    # Ouro, V 64, D 32, L 2, N 4, K 2, H 8, F 48, T 3, S 16. Matmul params per step:
    #   L (D H (2N + 2K) + 3 D F) + D V + D = 2 (3072 + 4608) + 2048 + 32 = 17440
    #   causal attention per layer 2 S N H = 1024;  forward = T (2 x 17440 + L x 1024) = 110784
    (tiny_config(), 110_784),
    # Loop-Residual, same sizes with N = 4 kv heads, prelude 1, coda 1. Per layer:
    #   2 (4 D^2 + 2 D F) + 2 S N H = 2 (4096 + 3072) + 1024 = 15360
    #   forward = 15360 (T L + 1 + 1) + 2 D V = 15360 x 8 + 4096 = 126976
    (loop_residual_config(), 126_976),
])
def test_flops_per_token_by_hand(cfg, forward):
  assert flops_per_token(cfg.model, 16, training=False) == forward
  assert flops_per_token(cfg.model, 16) == 3 * forward


def test_gate_bias_init_shifts_every_initial_gate_logit_by_exactly_the_bias():
  """model.gate_bias_init is the gate's bias at init; the rest of the model draws the same numbers."""
  import jax.numpy as jnp
  from flax import nnx
  from loopjax.model import build_model
  tokens_BS = jnp.arange(2 * 16).reshape(2, 16) % 64
  gates = {}
  for bias in (0.0, -2.0):
    model = build_model(tiny_config(gate_bias_init=bias).model, nnx.Rngs(0))
    assert float(model.exit_gate.bias[...]) == bias
    _, gates[bias] = model.step_losses(tokens_BS, tokens_BS)
  np.testing.assert_allclose(gates[-2.0], gates[0.0] - 2.0, rtol=0, atol=1e-5)


def test_depth_scaled_init_scales_only_the_residual_outputs_by_the_unrolled_depth():
  """wo and w_proj shrink by 1/sqrt(2 (prelude + layers x loops + coda)) = 1/sqrt(2 x 8); nothing else moves."""
  from flax import nnx
  from loopjax.config import ConfigError, validate
  from loopjax.model import build_model
  plain, scaled = (build_model(loop_residual_config(depth_scaled_init=flag).model, nnx.Rngs(0)) for flag in (False, True))
  factor = (2 * (1 + 2 * 3 + 1)) ** -0.5
  for stack in ("prelude", "block", "coda"):
    for name in getattr(plain, stack).names:
      want = np.asarray(getattr(getattr(plain, stack), name)[...]) * (factor if name in ("wo", "w_proj") else 1.0)
      np.testing.assert_allclose(np.asarray(getattr(getattr(scaled, stack), name)[...]), want, rtol=1e-6, atol=0)
  np.testing.assert_array_equal(np.asarray(scaled.wte[...]), np.asarray(plain.wte[...]))
  with pytest.raises(ConfigError, match="model.depth_scaled_init.*loop_residual"):
    validate(tiny_config(depth_scaled_init=True), 1)
