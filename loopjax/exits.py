"""The exit distribution over loop steps and the objectives built on it (SPEC section 2).

All functions are pure jnp on arrays with the loop-step axis first ([T, ...]). Per token and step t:

    lambda_t = sigmoid(gate_t)                       exit at t, given t was reached
    S_t      = prod_{j<=t} (1 - lambda_j),  S_0 = 1  survival
    p(t)     = lambda_t * S_{t-1}    for t < T
    p(T)     = S_{T-1}               the last step takes the remaining mass; lambda_T is unused
    CDF(n)   = 1 - S_n for n < T,  CDF(T) = 1

Everything is computed in log space (log lambda = log_sigmoid(g), log(1 - lambda) = log_sigmoid(-g))
so that p stays exact when gates saturate and log p(t) is finite for the entropy term.
"""

import jax
import jax.numpy as jnp


def exit_log_probs(gate_logits_T: jax.Array) -> jax.Array:
  """log p(t) over the leading T axis (any trailing shape)."""
  log_exit_T = jax.nn.log_sigmoid(gate_logits_T)
  log_stay_T = jax.nn.log_sigmoid(-gate_logits_T)
  # log S_{t-1} for t = 1..T: exclusive cumulative sum of log(1 - lambda), which never reads lambda_T.
  log_survival_before_T = jnp.concatenate(
      [jnp.zeros_like(log_stay_T[:1]), jnp.cumsum(log_stay_T[:-1], axis=0)], axis=0)
  log_p_T = log_exit_T + log_survival_before_T
  return log_p_T.at[-1].set(log_survival_before_T[-1])


def exit_distribution(gate_logits_T: jax.Array) -> jax.Array:
  """p(t) over the leading T axis; sums to 1 over t."""
  return jnp.exp(exit_log_probs(gate_logits_T))


def exit_cdf(gate_logits_T: jax.Array) -> jax.Array:
  """CDF(n) = 1 - S_n for n < T and exactly 1 at n = T.

  1 - S_n is -expm1(log S_n): with 1 - exp(.) an exit probability below float32's epsilon (a gate
  of -40 gives ~4e-18) would round to 0.
  """
  log_survival_T = jnp.cumsum(jax.nn.log_sigmoid(-gate_logits_T), axis=0)
  return (-jnp.expm1(log_survival_T)).at[-1].set(1.0)


def entropy(log_p_T: jax.Array) -> jax.Array:
  """H(p) = -sum_t p(t) log p(t) (natural log; 0 log 0 = 0)."""
  p_T = jnp.exp(log_p_T)
  return -jnp.sum(jnp.where(p_T > 0, p_T * log_p_T, 0.0), axis=0)


def geometric_log_prior(num_steps: int, exit_prob: float) -> jax.Array:
  """log of PonderNet's truncated geometric prior: q(t) = l (1-l)^(t-1) for t < T, q(T) = (1-l)^(T-1)."""
  t = jnp.arange(num_steps, dtype=jnp.float32)
  log_q = jnp.log(exit_prob) + t * jnp.log1p(-exit_prob)
  return log_q.at[-1].set((num_steps - 1) * jnp.log1p(-exit_prob))


def expected_exit_step(p_T: jax.Array) -> jax.Array:
  """E[t] = sum_t t p(t), steps counted from 1."""
  steps = jnp.arange(1, p_T.shape[0] + 1, dtype=p_T.dtype).reshape((-1,) + (1,) * (p_T.ndim - 1))
  return jnp.sum(steps * p_T, axis=0)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of x over the positions where mask is 1 (0 if none are)."""
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def stage1_loss(ce_TBS: jax.Array, gate_logits_TBS: jax.Array, loss_mask_BS: jax.Array, *, beta: float,
                prior: str = "uniform", geometric_lambda: float = 0.5, lm_weights: str = "exit"):
  """Stage I (pretraining) objective, averaged over tokens with loss_mask = 1.

    uniform prior:   L = sum_t p(t) CE_t - beta * H(p)
                     (= the negative ELBO with a uniform prior over exit steps, up to + beta log T)
    geometric prior: L = sum_t p(t) CE_t + beta * KL(p || Geometric(lambda_p))

  lm_weights "exit" (Ouro): gradients flow through every step's CE, weighted by p(t), and through the
  gate. "uniform" replaces the first term by sum_t p(t) sg(CE_t) + mean_t CE_t - sg(mean_t CE_t): the
  same value, the gate's gradient unchanged, but the LM's gradient weights every step by 1/T. With
  "exit" and beta = 0 the gate puts its mass on the step with the lowest CE early in training, the other
  steps then get ~0 weight and never catch up, so the choice locks in; "uniform" keeps every step
  trained, so the mass can move to deeper steps once they become better (experiments/RESULTS.md, claim c).

  Returns (loss, metrics) where the metrics hold per-step CE and exit mass, the mean entropy and the
  expected exit step.
  """
  mask_BS = loss_mask_BS.astype(ce_TBS.dtype)
  log_p_TBS = exit_log_probs(gate_logits_TBS)
  p_TBS = jnp.exp(log_p_TBS)
  if lm_weights == "exit":
    expected_ce_BS = jnp.sum(p_TBS * ce_TBS, axis=0)
  elif lm_weights == "uniform":
    mean_ce_BS = jnp.mean(ce_TBS, axis=0)
    expected_ce_BS = (jnp.sum(p_TBS * jax.lax.stop_gradient(ce_TBS), axis=0)
                      + mean_ce_BS - jax.lax.stop_gradient(mean_ce_BS))
  else:
    raise ValueError(f"unknown lm_weights {lm_weights!r}")
  entropy_BS = entropy(log_p_TBS)
  if prior == "uniform":
    regulariser_BS = -entropy_BS
  elif prior == "geometric":
    log_q_T1 = geometric_log_prior(ce_TBS.shape[0], geometric_lambda)[:, None, None]
    regulariser_BS = jnp.sum(p_TBS * (log_p_TBS - log_q_T1), axis=0)
  else:
    raise ValueError(f"unknown prior {prior!r}")
  loss = masked_mean(expected_ce_BS + beta * regulariser_BS, mask_BS)
  per_token_mean = jax.vmap(masked_mean, in_axes=(0, None))
  metrics = {
      "expected_ce": masked_mean(expected_ce_BS, mask_BS),
      "ce_per_step": per_token_mean(ce_TBS, mask_BS),
      "exit_probs": per_token_mean(p_TBS, mask_BS),
      "entropy": masked_mean(entropy_BS, mask_BS),
      "expected_exit_step": masked_mean(expected_exit_step(p_TBS), mask_BS),
  }
  return loss, metrics


def stage2_gate_loss(ce_TBS: jax.Array, gate_logits_TBS: jax.Array, loss_mask_BS: jax.Array, *,
                     k: float = 50.0, gamma: float = 0.005) -> jax.Array:
  """Stage II adaptive-gate loss, with per-token losses detached (the LM is frozen):

    I_t = max(0, CE_{t-1} - CE_t)                for t = 2..T
    w_t = sigmoid(k (I_t - gamma))               target probability of continuing past step t
    L_t = mean_i BCE(target = w_t, predicted continuation = 1 - lambda_t)
    L   = (1/T) sum_{t=2..T} L_t                 (the paper's 1/T normaliser, though the sum starts at 2)
  """
  ce_TBS = jax.lax.stop_gradient(ce_TBS)
  mask_BS = loss_mask_BS.astype(ce_TBS.dtype)
  improvement_TBS = jnp.maximum(0.0, ce_TBS[:-1] - ce_TBS[1:])
  target_continue_TBS = jax.nn.sigmoid(k * (improvement_TBS - gamma))
  # log(1 - lambda) = log_sigmoid(-g) is the log-probability of continuing.
  gates_TBS = gate_logits_TBS[1:]
  bce_TBS = -(target_continue_TBS * jax.nn.log_sigmoid(-gates_TBS)
              + (1.0 - target_continue_TBS) * jax.nn.log_sigmoid(gates_TBS))
  per_step_T = jax.vmap(masked_mean, in_axes=(0, None))(bce_TBS, mask_BS)
  return jnp.sum(per_step_T) / ce_TBS.shape[0]


def q_exit_step(gate_logits_TBS: jax.Array, q: float) -> jax.Array:
  """Q-exit: the first step index m (0-based) with CDF(m) >= q; the last step if none."""
  reached_TBS = exit_cdf(gate_logits_TBS) >= q
  return jnp.argmax(reached_TBS, axis=0)


def select_steps(step_values_TBS_: jax.Array, step_BS: jax.Array) -> jax.Array:
  """Pick, per token, the value of the chosen loop step: [T, B, S, ...] -> [B, S, ...]."""
  index = step_BS[None, ..., None] if step_values_TBS_.ndim == 4 else step_BS[None]
  return jnp.take_along_axis(step_values_TBS_, index, axis=0)[0]
