"""Loop-Residual GPT-2-81M (SPEC section 4): 6 GPT-2 layers looped 6 times, tied embeddings.

Reported OpenWebText validation loss 3.11 vs GPT-2-124M's 3.12 (12 layers, one pass).
"""

from loopjax.config import default_config


def get_config():
  c = default_config()
  m = c.model
  m.kind = "loop_residual"
  m.vocab_size = 50_304  # GPT-2's 50,257 padded to a multiple of 64
  m.hidden_size = 768
  m.num_layers = 6
  m.num_heads = 12
  m.num_kv_heads = 12
  m.head_dim = 64
  m.mlp_dim = 3072
  m.loop_steps = 6
  m.tie_embeddings = True
  m.max_positions = 1024
  m.remat = "full"
  c.train.seq_len = 1024
  c.train.batch_size = 480
  c.train.steps = 600_000
  c.optim.lr = 6e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 2000
  c.optim.end_lr = 6e-5
  c.optim.b2 = 0.95
  return c
