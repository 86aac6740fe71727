"""Ouro-1.4B (SPEC section 1) at its stage-1b training shape: L=24, D=2048, T=4, seq 4096.

1,434,652,673 parameters. bfloat16 compute with float32 parameters, full remat, loss in chunks so
the 49,152-way logits of the 4 loop steps never sit in memory at once. RoPE base 10K (stage 1; the
released files carry 1e6 after the long-context stage).
"""

from loopjax.config import default_config


def get_config():
  c = default_config()
  m = c.model
  m.vocab_size = 49_152
  m.hidden_size = 2048
  m.num_layers = 24
  m.num_heads = 16
  m.num_kv_heads = 16
  m.head_dim = 128
  m.mlp_dim = 5632
  m.loop_steps = 4
  m.rope_base = 10_000.0
  m.norm_eps = 1e-6
  m.param_dtype = "float32"
  m.compute_dtype = "bfloat16"
  m.remat = "full"
  m.loss_chunk = 1024
  c.objective.beta = 0.05
  c.optim.lr = 3e-4
  c.optim.schedule = "warmup_constant"
  c.optim.warmup_steps = 2000
  c.optim.end_lr = 3e-5
  c.train.seq_len = 4096
  c.train.batch_size = 2048  # 8M tokens
  c.train.steps = 100_000
  c.train.log_every = 50
  c.data.source = "mano"
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
