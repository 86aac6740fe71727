"""A small Ouro-style LoopLM (~21M parameters): D 512, 8 heads, 4 shared layers, T 4, vocab 8192, seq 256.

Big enough that matmuls dominate a CPU step (the benchmarks' "small" model), small enough to train
a few steps on 2 CPU cores. The built-in synthetic tasks use far fewer than 8192 token ids; the
vocabulary is sized like a real BPE tokenizer's so the LM head costs what it would on a corpus.
"""

from loopjax.config import default_config


def get_config():
  c = default_config()
  c.model.vocab_size = 8192
  c.model.hidden_size = 512
  c.model.num_layers = 4
  c.model.num_heads = 8
  c.model.num_kv_heads = 8
  c.model.head_dim = 64
  c.model.mlp_dim = 1376
  c.model.loop_steps = 4
  c.train.steps = 1000
  c.train.batch_size = 8
  c.train.seq_len = 256
  c.train.log_every = 10
  c.optim.lr = 1e-3
  c.optim.schedule = "wsd"
  c.optim.warmup_steps = 50
  c.optim.decay_steps = 200
  c.optim.end_lr = 1e-4
  return c
