"""Tiny configs and random parameters shared by the tests."""

import jax
import numpy as np
from flax import nnx

from loopjax.config import default_config
from loopjax.train.state import model_graph


def tiny_config(**model_overrides):
  """A model small enough to compile in seconds; divisible by a (2, 2, 2) mesh."""
  c = default_config()
  m = c.model
  m.vocab_size, m.hidden_size, m.num_layers = 64, 32, 2
  m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 4, 2, 8, 48
  m.loop_steps = 3
  m.rope_base = 100.0
  for key, value in model_overrides.items():
    setattr(m, key, value)
  c.train.batch_size, c.train.seq_len, c.train.steps, c.train.log_every = 4, 16, 10, 1
  c.train.progress = False
  c.optim.warmup_steps, c.optim.decay_steps = 2, 2
  return c


def random_params(model_cfg, seed: int = 0) -> dict:
  """Parameters well away from their init (norms ~1 +- 0.2, weights ~ 1/sqrt(fan_in)), as numpy."""
  _, abstract = model_graph(model_cfg)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(path[-1].key)
    if "norm" in name or name.endswith("scale"):
      return (1 + 0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
    fan_in = leaf.shape[-2] if leaf.ndim >= 2 else max(leaf.shape[-1:] or (1,))
    if name in ("wo", "wq", "wk", "wv"):
      fan_in = leaf.shape[-3] * leaf.shape[-2] if name == "wo" else leaf.shape[-3]
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(abstract))


def merged_model(model_cfg, params):
  graphdef, _ = model_graph(model_cfg)
  return nnx.merge(graphdef, jax.tree.map(np.asarray, params))


def random_batch(cfg, seed: int = 0, num_docs: int = 1) -> dict:
  """A batch of random tokens; with num_docs > 1 each row is split into that many documents."""
  rng = np.random.default_rng(seed)
  B, S, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
  tokens = rng.integers(0, V, (B, S + 1))
  bounds = np.sort(rng.choice(np.arange(1, S), num_docs - 1, replace=False)) if num_docs > 1 else []
  segment_ids = np.ones((B, S), np.int32) + np.searchsorted(bounds, np.arange(S), side="right")[None]
  starts = np.concatenate([[0], bounds]).astype(int)
  positions = np.arange(S)[None] - starts[segment_ids - 1]
  same_doc_next = np.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1], np.ones((B, 1), bool)], 1)
  return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
          "loss_mask": same_doc_next.astype(np.float32), "segment_ids": segment_ids.astype(np.int32),
          "positions": positions.astype(np.int32)}
