"""Exit-distribution math against values computed by hand.

The 3-step example: gates g = (0, ln 3, anything) give lambda = (1/2, 3/4, unused), so
  p = (1/2, 3/4 * 1/2, 1/4 * 1/2) = (0.5, 0.375, 0.125),  CDF = (0.5, 0.875, 1)
  H = -(0.5 ln 0.5 + 0.375 ln 0.375 + 0.125 ln 0.125) = 0.974315...
  with CE = (2, 1, 0.5):  sum_t p CE = 1 + 0.375 + 0.0625 = 1.4375
  Stage I loss at beta = 0.1: 1.4375 - 0.0974315 = 1.3400685;  E[exit step] = 1.625
  KL(p || Geometric(1/2) truncated: q = (0.5, 0.25, 0.25)) = 0.375 ln 1.5 + 0.125 ln 0.5 = 0.0654061
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax import exits

GATES_T11 = jnp.array([0.0, math.log(3.0), 7.0]).reshape(3, 1, 1)
CE_T11 = jnp.array([2.0, 1.0, 0.5]).reshape(3, 1, 1)
MASK_11 = jnp.ones((1, 1))


def test_hand_computed_three_step_example():
  np.testing.assert_allclose(exits.exit_distribution(GATES_T11).ravel(), [0.5, 0.375, 0.125], rtol=1e-6)
  np.testing.assert_allclose(exits.exit_cdf(GATES_T11).ravel(), [0.5, 0.875, 1.0], rtol=1e-6)
  loss, m = exits.stage1_loss(CE_T11, GATES_T11, MASK_11, beta=0.1)
  H = -(0.5 * math.log(0.5) + 0.375 * math.log(0.375) + 0.125 * math.log(0.125))
  np.testing.assert_allclose(m["entropy"], H, rtol=1e-6)
  np.testing.assert_allclose(H, 0.974315, rtol=1e-6)
  np.testing.assert_allclose(m["expected_ce"], 1.4375, rtol=1e-6)
  np.testing.assert_allclose(loss, 1.4375 - 0.1 * H, rtol=1e-6)
  np.testing.assert_allclose(m["expected_exit_step"], 1.625, rtol=1e-6)
  np.testing.assert_allclose(m["ce_per_step"], [2.0, 1.0, 0.5])
  np.testing.assert_allclose(m["exit_probs"], [0.5, 0.375, 0.125], rtol=1e-6)


def test_geometric_prior_kl_by_hand():
  loss, m = exits.stage1_loss(CE_T11, GATES_T11, MASK_11, beta=1.0, prior="geometric", geometric_lambda=0.5)
  kl = 0.375 * math.log(1.5) + 0.125 * math.log(0.5)
  np.testing.assert_allclose(kl, 0.0654061, rtol=1e-5)
  np.testing.assert_allclose(loss, 1.4375 + kl, rtol=1e-6)


def test_last_gate_is_unused_and_mass_sums_to_one():
  gates = jax.random.normal(jax.random.key(0), (5, 4, 7)) * 3
  p = exits.exit_distribution(gates)
  np.testing.assert_allclose(p.sum(0), 1.0, rtol=1e-6)
  p_changed_last = exits.exit_distribution(gates.at[-1].set(-40.0))
  np.testing.assert_array_equal(p, p_changed_last)
  lam64 = 1 / (1 + np.exp(-np.asarray(gates, np.float64)))
  np.testing.assert_allclose(p[-1], np.prod(1 - lam64[:-1], axis=0), rtol=1e-5)


def test_saturated_gates_stay_finite():
  gates = jnp.full((4, 2, 3), 60.0)  # exits at step 1 with probability ~1
  loss, m = exits.stage1_loss(jnp.ones((4, 2, 3)), gates, jnp.ones((2, 3)), beta=0.1)
  grad = jax.grad(lambda g: exits.stage1_loss(jnp.ones((4, 2, 3)), g, jnp.ones((2, 3)), beta=0.1)[0])(gates)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(m["exit_probs"], [1, 0, 0, 0], atol=1e-12)


def test_loss_mask_excludes_tokens():
  ce = jnp.stack([jnp.array([[1.0, 100.0]])] * 3)
  gates = jnp.zeros((3, 1, 2))
  loss, m = exits.stage1_loss(ce, gates, jnp.array([[1.0, 0.0]]), beta=0.0)
  np.testing.assert_allclose(loss, 1.0, rtol=1e-6)


def test_cdf_keeps_tiny_exit_probabilities():
  """Gates of -40 exit with lambda = 1 / (1 + e^40) ~ 4.2e-18, far below float32's epsilon next to 1.

  By hand: CDF(1) = lambda, CDF(2) = 1 - (1 - lambda)^2 = lambda (2 - lambda) (expanded, since
  1 - lambda rounds to 1 even in float64), CDF(3) = 1. Float32 relative error: rtol 1e-6.
  """
  lam = 1 / (1 + math.exp(40.0))
  cdf = exits.exit_cdf(jnp.full((3, 1, 1), -40.0)).ravel()
  assert np.all(np.asarray(cdf) > 0)
  np.testing.assert_allclose(cdf, [lam, lam * (2 - lam), 1.0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("q,step", [(0.5, 0), (0.8, 1), (0.9, 2), (1.0, 2)])
def test_q_exit_picks_first_step_reaching_q(q, step):
  assert int(exits.q_exit_step(GATES_T11, q)[0, 0]) == step


def test_stage2_gate_loss_by_hand():
  """CE drops 1.0 then 0.001: targets w = (sigmoid(50 * 0.995) ~ 1, sigmoid(50 * -0.004) = sigmoid(-0.2)).

  Continuation probabilities 1 - lambda = (0.25, 0.5) from gates (ln 3, 0); normaliser 1/T = 1/3.
  """
  ce = jnp.array([2.0, 1.0, 0.999]).reshape(3, 1, 1)
  gates = jnp.array([5.0, math.log(3.0), 0.0]).reshape(3, 1, 1)
  w3 = 1 / (1 + math.exp(0.2))
  bce2 = -math.log(0.25)
  bce3 = -(w3 * math.log(0.5) + (1 - w3) * math.log(0.5))
  expected = (bce2 + bce3) / 3
  np.testing.assert_allclose(exits.stage2_gate_loss(ce, gates, MASK_11), expected, rtol=1e-5)
  grad_ce = jax.grad(lambda c: exits.stage2_gate_loss(c, gates, MASK_11))(ce)
  np.testing.assert_array_equal(grad_ce, 0.0)  # the LM's losses are detached


def test_uniform_lm_weights_keep_the_loss_and_the_gate_gradient_and_weight_each_step_one_over_T():
  """lm_weights="uniform": same value and gate gradient as "exit"; dL/dCE_t = mask / (tokens x T) by hand."""
  rng = np.random.default_rng(0)
  ce = jnp.asarray(rng.uniform(0.5, 3.0, (4, 2, 3)))
  gates = jnp.asarray(rng.normal(size=(4, 2, 3)))
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])

  def loss(lm_weights):
    return lambda c, g: exits.stage1_loss(c, g, mask, beta=0.05, lm_weights=lm_weights)[0]

  (d_ce_exit, d_gate_exit), (d_ce_uniform, d_gate_uniform) = (
      jax.grad(loss(w), argnums=(0, 1))(ce, gates) for w in ("exit", "uniform"))
  np.testing.assert_allclose(loss("uniform")(ce, gates), loss("exit")(ce, gates), rtol=1e-12)
  np.testing.assert_allclose(d_gate_uniform, d_gate_exit, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(d_ce_uniform, np.broadcast_to(mask / 4 / 4, (4, 2, 3)), rtol=1e-12)
  np.testing.assert_allclose(d_ce_exit, exits.exit_distribution(gates) * mask / 4, rtol=1e-12)
  with pytest.raises(ValueError, match="lm_weights"):
    exits.stage1_loss(ce, gates, mask, beta=0.0, lm_weights="p")
