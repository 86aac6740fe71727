"""The scanned, rematerialised models equal plain unrolled float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from helpers import merged_model, random_batch, random_params, tiny_config
from loopjax import exits
from loopjax.model.ouro import loop_step
from loopjax.train.step import model_losses
from loopjax.train.state import model_graph

RTOL = 1e-5  # max |error| / max |reference|, float32 vs float64


def rel_err(actual, expected):
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("num_docs,overrides", [
    (1, {}),
    (3, {}),  # packed rows: document masks and per-document positions
    (1, {"num_kv_heads": 4, "remat": "none"}),
    (2, {"tie_embeddings": True, "remat": "save_matmuls", "loop_steps": 5}),
])
def test_ouro_forward_matches_unrolled_reference(num_docs, overrides):
  cfg = tiny_config(**overrides)
  params = random_params(cfg.model, seed=num_docs)
  batch = random_batch(cfg, seed=1, num_docs=num_docs)
  out = merged_model(cfg.model, params)(batch["inputs"], segment_ids_BS=batch["segment_ids"],
                                        positions_BS=batch["positions"])
  p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  ref_logits, ref_gates = reference.ouro_forward(
      p64, batch["inputs"], batch["segment_ids"], batch["positions"].astype(np.float64),
      loop_steps=cfg.model.loop_steps, eps=cfg.model.norm_eps, rope_base=cfg.model.rope_base)
  assert rel_err(out.step_logits, ref_logits) <= RTOL
  assert rel_err(out.gate_logits, ref_gates) <= RTOL


def test_loop_residual_matches_unrolled_reference():
  cfg = tiny_config(kind="loop_residual", num_kv_heads=4, head_dim=8, loop_steps=3, tie_embeddings=True,
                    max_positions=32)
  params = random_params(cfg.model, seed=3)
  batch = random_batch(cfg, seed=2)
  out = merged_model(cfg.model, params)(batch["inputs"])
  ref = reference.gpt2_forward(jax.tree.map(lambda x: np.asarray(x, np.float64), params), batch["inputs"],
                               loop_steps=3)
  assert out.step_logits.shape[0] == 1
  assert rel_err(out.step_logits[0], ref) <= RTOL


def test_documents_are_isolated():
  """Replacing the other documents in a row leaves every token of document 2 unchanged."""
  cfg = tiny_config()
  model = merged_model(cfg.model, random_params(cfg.model))
  batch = random_batch(cfg, seed=4, num_docs=3)
  changed = dict(batch, inputs=np.where(batch["segment_ids"] == 2, batch["inputs"],
                                        (batch["inputs"] + 7) % cfg.model.vocab_size))
  doc2 = batch["segment_ids"] == 2
  kwargs = lambda b: dict(segment_ids_BS=b["segment_ids"], positions_BS=b["positions"])
  a = model(batch["inputs"], **kwargs(batch)).step_logits
  b = model(changed["inputs"], **kwargs(changed)).step_logits
  np.testing.assert_allclose(np.asarray(a)[:, doc2], np.asarray(b)[:, doc2], rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(a)[:, ~doc2], np.asarray(b)[:, ~doc2])  # the edit did change others


def test_loop_step_is_the_whole_loop_body():
  """A `lax.while_loop` over `ouro.loop_step` (how a decoder drives it) gives run_loop's states and gates."""
  cfg = tiny_config()
  model = merged_model(cfg.model, random_params(cfg.model))
  batch = random_batch(cfg, num_docs=2)
  h_TBSD, gate_TBS = model.run_loop(batch["inputs"], lambda h_BSD, _: h_BSD, segment_ids_BS=batch["segment_ids"],
                                    positions_BS=batch["positions"])
  context = model.loop_context(batch["inputs"], batch["segment_ids"], batch["positions"])
  parts = model.loop_parts()

  def body(carry):
    t, h_BSD, gates_TBS = carry
    h_BSD, gate_BS = loop_step(parts, h_BSD, context)
    return t + 1, h_BSD, gates_TBS.at[t].set(gate_BS)

  h0_BSD = jnp.take(model.embed[...], batch["inputs"], axis=0)
  _, h_BSD, gates_TBS = jax.lax.while_loop(lambda carry: carry[0] < cfg.model.loop_steps, body,
                                           (0, h0_BSD, jnp.zeros_like(gate_TBS)))
  np.testing.assert_allclose(h_BSD, h_TBSD[-1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gates_TBS, gate_TBS, rtol=1e-6, atol=1e-6)


def test_training_path_matches_logits_path_and_chunking():
  """step_losses (CE inside the loop scan, optionally chunked) equals CE of the returned logits."""
  cfg = tiny_config()
  params = random_params(cfg.model)
  batch = random_batch(cfg, num_docs=2)
  out = merged_model(cfg.model, params)(batch["inputs"], segment_ids_BS=batch["segment_ids"],
                                        positions_BS=batch["positions"])
  logits = np.asarray(out.step_logits, np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  expected = lse - np.take_along_axis(logits, batch["targets"][None, ..., None], -1)[..., 0]
  for chunk in (0, 4):
    cfg.model.loss_chunk = chunk
    graphdef, _ = model_graph(cfg.model)
    ce_TBS, gate_TBS = model_losses(graphdef, params, batch)
    np.testing.assert_allclose(ce_TBS, expected, rtol=2e-5)
    np.testing.assert_allclose(gate_TBS, out.gate_logits, rtol=1e-6)


@pytest.mark.parametrize("policy", ["full", "save_matmuls", "save_attention_out", "save_attention_core"])
def test_remat_policies_give_the_same_gradients(policy):
  def grads(remat):
    cfg = tiny_config(remat=remat)
    graphdef, _ = model_graph(cfg.model)
    batch = random_batch(cfg, num_docs=2)
    def loss(params):
      ce, gate = model_losses(graphdef, params, batch)
      return exits.stage1_loss(ce, gate, batch["loss_mask"], beta=0.1)[0]
    return jax.grad(loss)(jax.tree.map(jnp.asarray, random_params(cfg.model)))
  for a, b in zip(jax.tree.leaves(grads("none")), jax.tree.leaves(grads(policy))):
    assert rel_err(b, np.asarray(a, np.float64)) <= RTOL
