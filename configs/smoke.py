"""Tiny looped LM on the built-in multi-hop QA task: trains in about a minute on 2 CPU cores.

Multi-hop QA (SPEC section 6) is learnable at this size in a few hundred steps, so the run shows the
answer loss falling and the exit distribution moving; Mano at the same size stays at chance.
"""

from loopjax.config import default_config


def get_config():
  c = default_config()
  c.model.vocab_size = 128  # the multi-hop task uses 74 ids
  c.model.hidden_size = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 16
  c.model.mlp_dim = 160
  c.model.loop_steps = 4
  c.train.steps = 300
  c.train.batch_size = 8
  c.train.seq_len = 128
  c.train.log_every = 10
  c.optim.lr = 3e-3
  c.optim.schedule = "wsd"
  c.optim.warmup_steps = 20
  c.optim.decay_steps = 60
  c.optim.end_lr = 3e-4
  c.objective.beta = 0.1
  c.data.source = "multihop"
  return c
