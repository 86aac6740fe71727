"""Held-out evaluation: per-step loss and exact match, at the trained T and others, on a sharded mesh."""

import jax
import numpy as np
import pytest

from helpers import random_params, tiny_config
from loopjax import sharding
from loopjax.evaluation import exact_match, teacher_forced
from loopjax.train.state import model_graph


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config()
  cfg.data.source, cfg.data.mano_max_ops = "mano", 2
  cfg.train.batch_size, cfg.train.seq_len = 8, 64
  cfg.eval.loop_steps, cfg.eval.num_batches = "1,3,5", 2
  graphdef, _ = model_graph(cfg.model)
  params = jax.tree.map(np.asarray, random_params(cfg.model, seed=2))
  return cfg, graphdef, params, teacher_forced.eval_batches(cfg)


def evaluate(cfg, params, mesh, batches):
  return teacher_forced.Evaluator(cfg, mesh, batches)(params)


def test_reports_every_loop_count(setup):
  cfg, graphdef, params, batches = setup
  results = evaluate(cfg, params, sharding.make_mesh((2, 2, 1, 2)), batches)
  for T in (1, 3, 5):
    assert len(results[f"eval_T{T}/ce_per_step"]) == T
    assert len(results[f"eval_T{T}/exact_match_per_step"]) == T
    assert abs(sum(results[f"eval_T{T}/exit_probs"]) - 1) < 1e-5
  # Steps are causal in T: step 1 is the same model whatever T is.
  assert results["eval_T1/ce_per_step"][0] == pytest.approx(results["eval_T5/ce_per_step"][0], rel=1e-5)


def test_matches_an_unsharded_recomputation(setup):
  """Per-step CE and exact match recomputed from the full logits on one device, batch by batch."""
  cfg, graphdef, params, batches = setup
  results = evaluate(cfg, params, sharding.make_mesh((8, 1, 1, 1)), batches)
  from flax import nnx
  model = nnx.merge(graphdef, params)
  ce_sum, tokens, correct, questions = np.zeros(3), 0.0, np.zeros(3), 0
  for b in batches:
    out = model(b["inputs"], segment_ids_BS=b["segment_ids"], positions_BS=b["positions"], loop_steps=3)
    logits = np.asarray(out.step_logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, b["targets"][None, ..., None], -1)[..., 0]
    ce_sum += (ce * b["loss_mask"]).sum(axis=(1, 2))
    tokens += b["loss_mask"].sum()
    for t in range(3):
      correct[t] += exact_match.exact_match_counts(logits[t].argmax(-1), b)[0]
    questions += exact_match.exact_match_counts(logits[0].argmax(-1), b)[1]
  np.testing.assert_allclose(results["eval_T3/ce_per_step"], ce_sum / tokens, rtol=1e-5)
  np.testing.assert_allclose(results["eval_T3/exact_match_per_step"], correct / questions)
  assert questions > 0


def test_no_held_out_batch_is_a_config_error(setup):
  from loopjax.config import ConfigError
  cfg = setup[0]
  with pytest.raises(ConfigError, match=r"^config.eval.source: 'mano' yields no held-out batch.*Fix: "):
    teacher_forced.Evaluator(cfg, sharding.make_mesh((8, 1, 1, 1)), batches=[])
