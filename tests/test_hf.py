"""Ouro HF import reproduces the released model code's outputs (tests/fixtures/ouro_tiny_mha)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import OURO_FIXTURE as FIXTURE
from loopjax import exits
from loopjax.hf import load_ouro

RTOL = 1e-4  # float32 rounding, as the issue states; relative to the array's scale


def rel_err(actual, expected):
  return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(os.path.join(FIXTURE, "expected.npz")))


@pytest.fixture(scope="module")
def outputs(reference):
  model = load_ouro(os.path.join(FIXTURE, "hf"))
  return model(jnp.asarray(reference["input_ids"], jnp.int32)), model


def test_step_logits_gates_and_exit_probs_match(reference, outputs):
  out, _ = outputs
  assert out.step_logits.shape == reference["step_logits"].shape
  assert rel_err(out.step_logits, reference["step_logits"]) <= RTOL
  assert rel_err(out.gate_logits, reference["gate_logits"]) <= RTOL
  assert rel_err(out.exit_probs, reference["exit_pdf"]) <= RTOL


def test_objective_matches_reference_reductions(reference, outputs):
  out, _ = outputs
  ids = jnp.asarray(reference["input_ids"], jnp.int32)
  logits = out.step_logits[:, :, :-1]
  ce_TBS = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[None, :, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(ce_TBS.mean(axis=(1, 2)), reference["per_step_ce"], rtol=1e-5)
  mask = jnp.ones(ids[:, 1:].shape)
  loss, metrics = exits.stage1_loss(ce_TBS, out.gate_logits[:, :, :-1], mask, beta=0.1)
  np.testing.assert_allclose(metrics["expected_ce"], reference["expected_loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["entropy"], reference["entropy"], rtol=1e-5)
  np.testing.assert_allclose(loss, reference["objective"], rtol=1e-5)


def test_q_exit_matches_reference(reference, outputs):
  out, _ = outputs
  step_BS = exits.q_exit_step(out.gate_logits, 0.5)
  np.testing.assert_array_equal(step_BS, reference["qexit_step"])
  assert rel_err(exits.select_steps(out.step_logits, step_BS), reference["qexit_logits"]) <= RTOL


@pytest.mark.parametrize("loop_steps", [2, 6])
def test_other_loop_counts(reference, outputs, loop_steps):
  """Steps are causal in t: the first min(T, 4) steps agree with the T=4 reference; p is re-normalised."""
  _, model = outputs
  out = model(jnp.asarray(reference["input_ids"], jnp.int32), loop_steps=loop_steps)
  shared = min(loop_steps, 4)
  assert out.step_logits.shape[0] == loop_steps
  assert rel_err(out.step_logits[:shared], reference["step_logits"][:shared]) <= RTOL
  assert rel_err(out.gate_logits[:shared], reference["gate_logits"][:shared]) <= RTOL
  lam = jax.nn.sigmoid(np.asarray(out.gate_logits, np.float64))
  survive = np.cumprod(1 - lam, axis=0)
  expected = np.concatenate([lam[:1], lam[1:-1] * survive[:-2], survive[-2:-1]], axis=0)
  np.testing.assert_allclose(out.exit_probs, expected, rtol=1e-5, atol=1e-7)
