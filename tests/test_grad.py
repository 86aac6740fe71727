"""The gradient of the Stage I objective equals finite differences, everything in float64.

The derivative is Richardson-extrapolated, (4 D(eps/2) - D(eps)) / 3, which cancels the O(eps^2)
truncation error of central differences along unit directions;
in float64 the remaining error is far below rtol = 1e-6. A wrong gradient term (a missing entropy or
gate path) is off by percent. (Float64 matters: jax's fused attention takes its softmax in float32,
which limited plain float32-softmax differences to ~1e-4; the float64 model uses exact attention.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, random_params, tiny_config
from loopjax.train.state import model_graph
from loopjax.train.step import objective

EPS, RTOL = 1e-3, 1e-6


def richardson(f, eps=EPS):
  """d/ds f(s) at s = 0, with O(eps^4) truncation error."""
  central = lambda h: (f(h) - f(-h)) / (2 * h)
  return (4 * central(eps / 2) - central(eps)) / 3


@pytest.mark.parametrize("loss_remat", ["recompute", "save"])
def test_objective_gradient_matches_finite_differences(loss_remat):
  """Both LM-head backward paths: recomputed chunked logits, and the saved logit gradient (custom_vjp)."""
  with jax.enable_x64(True):
    cfg = tiny_config(param_dtype="float64", compute_dtype="float64", remat="full", loss_chunk=8,
                      loss_remat=loss_remat)
    cfg.model.num_layers, cfg.model.loop_steps = 1, 3
    cfg.train.batch_size, cfg.train.seq_len = 2, 8
    graphdef, _ = model_graph(cfg.model)
    params = jax.tree.map(jnp.asarray, random_params(cfg.model, seed=5))
    batch = random_batch(cfg, seed=6, num_docs=2)
    loss = jax.jit(lambda p: objective(cfg, p, batch)[0])
    grads = jax.grad(lambda p: objective(cfg, p, batch)[0])(params)

    rng = np.random.default_rng(0)
    # Directional derivatives along random directions touch every parameter at once ...
    for _ in range(3):
      direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), params)
      norm = jnp.sqrt(sum(jnp.vdot(d, d) for d in jax.tree.leaves(direction)))
      direction = jax.tree.map(lambda d: d / norm, direction)  # unit length: eps is the step size
      numeric = richardson(lambda s: loss(jax.tree.map(lambda p, d: p + s * d, params, direction)))
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
      np.testing.assert_allclose(analytic, numeric, rtol=RTOL)
    # ... and single coordinates check the gate and the first layer on their own.
    for group, name in (("exit_gate", "bias"), ("exit_gate", "kernel"), ("stack", "wq"), ("stack", "norm_mlp_out"),
                        ("lm_head", None), ("embed", None)):
      leaf, grad = (params[group], grads[group]) if name is None else (params[group][name], grads[group][name])
      index = tuple(int(i) for i in np.unravel_index(rng.integers(leaf.size), leaf.shape))
      bumped = lambda s: loss(_bump(params, group, name, index, s))
      np.testing.assert_allclose(grad[index], richardson(bumped), rtol=RTOL, atol=1e-8)


def _bump(params, group, name, index, s):
  """params with params[group][name][index] (or params[group][index]) increased by s."""
  if name is None:
    return {**params, group: params[group].at[index].add(s)}
  return {**params, group: {**params[group], name: params[group][name].at[index].add(s)}}
