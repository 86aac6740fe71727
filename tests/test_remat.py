"""Every remat policy does what its name says: counted in the compiled gradient of one layer.

With the dense (xla) core an Ouro layer has 9 matmuls forward (q, k, v, o projections; q k^T and p v in
attention; gate, up and down of the MLP) and 18 backward. "none" recomputes nothing; "save_matmuls"
recomputes only the two attention matmuls (they have batch dimensions, so the policy does not save their
[B, N, S, S] outputs); "save_attention_out" keeps the o-projection's output and recomputes the other 8;
"full" recomputes all 9. "save_attention_core" names the blocked core's residuals, which the xla core
does not have, so there it recomputes all 9 like "full". With the blocked core (two blocks, so its loops
stay loops) the 2 attention matmuls sit in the forward loop and 5 in the backward loop (the
probabilities recomputed, dp, dq, dk, dv): 9 forward, 19 backward, and "save_attention_core" recomputes
the 7 projection and MLP matmuls but not the attention loop. The native core is one FFI call each way
(no dots): 7 forward, 14 backward, and the policies that recompute attention ("save_matmuls" too: the
call is not a matmul) call its forward twice, where "none" and "save_attention_core" call it once. The dot count of the
optimized HLO (and the native core's forward calls) must come out exactly so. (With one layer XLA removes the scan's loop and merges the recomputation with the
forward pass, so the count is taken with two.)
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_params, tiny_config
from loopjax.model import attention, layers
from loopjax.model.stack import scan_layers

DOTS = {"xla": (9, 18), "blocked": (9, 19), "native": (7, 14)}  # forward, backward
RECOMPUTED = {"xla": {"none": 0, "save_matmuls": 2, "save_attention_out": 8, "save_attention_core": 9, "full": 9},
              "blocked": {"none": 0, "save_matmuls": 2, "save_attention_out": 8, "save_attention_core": 7,
                          "full": 9},
              "native": {"none": 0, "save_matmuls": 0, "save_attention_out": 6, "save_attention_core": 7, "full": 7}}
NATIVE_FORWARD_CALLS = {"none": 1, "save_matmuls": 2, "save_attention_out": 2, "save_attention_core": 1, "full": 2}


def compiled_gradient(policy: str, core: str) -> str:
  cfg = tiny_config(num_layers=2)  # two layers: the scan stays a loop, so XLA cannot merge fwd and recompute
  m = cfg.model
  stack = jax.tree.map(jnp.asarray, random_params(m)["stack"])
  B, S = 2, 16
  x_BSD = jnp.asarray(np.random.default_rng(0).standard_normal((B, S, m.hidden_size)), jnp.float32)
  cos_BSH, sin_BSH = layers.rope_tables(jnp.broadcast_to(jnp.arange(S), (B, S)), m.head_dim, m.rope_base)

  def loss(stack, x_BSD):
    mask = attention.Mask(None, core, block_q=S // 2, block_kv=S // 2)
    layer = lambda p, x: layers.sandwich_layer(p, x, cos_BSH, sin_BSH, mask, eps=m.norm_eps, dtype=jnp.float32)
    return jnp.sum(scan_layers(layer, stack, x_BSD, policy) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(stack, x_BSD).compile().as_text()


@pytest.mark.parametrize("core,policy", [(core, policy) for core in RECOMPUTED for policy in sorted(RECOMPUTED[core])])
def test_remat_policy_recomputes_what_its_name_says(core, policy):
  hlo = compiled_gradient(policy, core)
  assert len(re.findall(r"= \S+ dot\(", hlo)) == sum(DOTS[core]) + RECOMPUTED[core][policy]
  if core == "native":
    assert hlo.count('custom_call_target="loopjax_attention_forward"') == NATIVE_FORWARD_CALLS[policy]
    assert hlo.count('custom_call_target="loopjax_attention_backward"') == 1


def test_unrolled_scans_compute_the_same_loss_and_gradients():
  """model.layer_unroll / loop_unroll change how XLA loops, not the math: float64, to 1e-12."""
  from helpers import random_batch
  from loopjax.train.step import objective
  with jax.enable_x64(True):
    results = []
    for layer_unroll, loop_unroll in ((1, 1), (2, 3)):
      cfg = tiny_config(param_dtype="float64", compute_dtype="float64", remat="none", layer_unroll=layer_unroll,
                        loop_unroll=loop_unroll)
      params = jax.tree.map(jnp.asarray, random_params(cfg.model))
      batch = {k: jnp.asarray(v) for k, v in random_batch(cfg, num_docs=2).items()}
      results.append(jax.value_and_grad(lambda p: objective(cfg, p, batch)[0])(params))
  (loss_a, grads_a), (loss_b, grads_b) = results
  np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-12)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-13)
