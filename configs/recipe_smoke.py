"""The Ouro recipe's shape (configs/ouro_recipe.py) at toy size: every kind of phase change, in minutes.

    loopjax train --config configs/recipe_smoke.py --workdir runs/recipe_smoke

| phase | steps | LR | batch (tokens) | seq | T | beta | RoPE base | mixture mano,multihop,capo | other |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| 1a | 8 | warmup 2 to 3e-3, constant | 128 -> 256 ramp (2 stages, 4 steps) | 32 | 8 | 0.1 | 10K | 0.6,0.3,0.1 | |
| 1b | 6 | 3e-3 | 256 | 32 | 4 | 0.05 | 10K | same | upscale 2 -> 4 layers (interleave) |
| 2 | 6 | cosine to 3e-4 | 512 | 64 | 4 | 0.05 | 40K | 0.2,0.5,0.3 | |
| 3 | 4 | 3e-4 | 1024 | 128 | 4 | 0.05 | 1M | same | |
| 4 | 4 | cosine to 1e-4 | 512 | 64 | 4 | 0.05 | 1M | same | |
| gate | 6 | 3e-3 | 512 | 64 | 4 | | 1M | same | Stage II: only the exit gate trains |

The batch ramp rounds to whole data-parallel groups of rows, so it shows its stages on one device (how
`loopjax train` runs it here); the mesh is whatever devices there are (mesh.data = -1).
"""

from loopjax.config import default_config
from loopjax.phases import phase


def get_config():
  c = default_config()
  m = c.model
  m.vocab_size = 384  # the three tasks use 327 ids
  m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 32, 2, 4, 2, 8, 64
  m.remat = "none"  # nothing to save at this size, and it compiles faster
  c.data.source = "mano,multihop,capo"
  c.train.seq_len, c.train.batch_size = 32, 8
  c.train.log_every = 1
  c.train.steps = 0  # the recipe's own length (N > 0: the recipe scaled to N steps)
  c.train.progress = False
  c.checkpoint.every_steps = 3  # so a restart also resumes inside a phase
  c.checkpoint.keep = 3
  c.phases = (
      phase(name="1a", steps=8, lr=3e-3, warmup_steps=2, batch_tokens=256, batch_ramp_from=128,
            batch_ramp_steps=4, batch_ramp_stages=2, seq_len=32, loop_steps=8, beta=0.1, rope_base=10_000.0,
            data_weights="0.6,0.3,0.1"),
      phase(name="1b", steps=6, loop_steps=4, beta=0.05, upscale={"layers": 4, "mapping": "interleave"}),
      phase(name="2", steps=6, lr_shape="cosine", end_lr=3e-4, batch_tokens=512, seq_len=64, rope_base=40_000.0,
            data_weights="0.2,0.5,0.3"),
      phase(name="3", steps=4, batch_tokens=1024, seq_len=128, rope_base=1_000_000.0),
      phase(name="4", steps=4, lr_shape="cosine", end_lr=1e-4, batch_tokens=512, seq_len=64),
      phase(name="gate", steps=6, lr=3e-3, objective="gate"),
  )
  return c
