"""Ouro's five-stage pretraining recipe (SPEC section 3), as one staged config.

    loopjax train --config configs/ouro_recipe.py:1p4b --workdir runs/ouro1p4b   # 24 layers throughout
    loopjax train --config configs/ouro_recipe.py:2p6b --workdir runs/ouro2p6b   # 24 -> 48 layers at 1b
    loopjax train --config configs/ouro_recipe.py:2p6b-stack ...                 # ... repeating the stack

| stage | tokens | LR | batch (tokens) | seq | T | beta | RoPE base |
| --- | --- | --- | --- | --- | --- | --- | --- |
| 1a | 3T | warmup to 3e-4, then constant | 4M ramped to 8M | 4K | 8 | 0.1 | 10K |
| 1b | 3T | 3e-4 constant | 8M | 4K | 4 | 0.05 | 10K |
| 2 CT anneal | 1.4T | cosine to 3e-5 | 8M | 16K | 4 | 0.05 | 40K |
| 3 LongCT | 20B | 3e-5 constant | 8M | 64K | 4 | 0.05 | 1M |
| 4 mid-train | 300B | cosine to 1e-5 | 8M | 32K | 4 | 0.05 | 1M |

Every number above is the paper's. The ones it does not publish are ours: the warmup (2,000 steps,
as configs/ouro_1p4b.py), the ramp (4 equal increments of 1M tokens over the first 20,000 steps), the
layer mapping of the 2.6B fork (interleave unless "-stack"), and that the duplicated layers keep their
Adam moments. "M" is 2**20 tokens (so 4M and 8M are whole 4K sequences), "T"/"B" are 1e12/1e9 tokens.
The stages' data mixtures (web/code/math, then math/code/long-context/SFT-style) need prepared corpora:
set data.source to them and give each phase its `data_weights`. Stage II (gate training, SPEC section 2)
is not in the stage table; append `phase(name="gate", objective="gate", ...)` to run it.
"""

from loopjax.config import load_config_file
from loopjax.phases import phase

M = 2**20


def get_config(path: str = "1p4b"):
  size, _, mapping = path.partition("-")
  if size not in ("1p4b", "2p6b") or mapping not in ("", "stack"):
    raise ValueError(f"configs/ouro_recipe.py:{path}: use 1p4b, 2p6b or 2p6b-stack")
  c = load_config_file("ouro_1p4b.py", relative_to=__file__)  # the 24-layer model the recipe starts from
  c.train.steps = 0  # the recipe's own length (N > 0: the recipe scaled to N steps)
  # Memory plan (BUILD.md, "Memory plan"; figures in BENCHMARKS.md): one sequence per data-parallel shard at
  # a time, the 8M-token batch accumulated over microbatches; FSDP over every chip (mesh.fsdp=-1), and context
  # parallelism where one sequence's activations are too large for a chip (T=8 at 4K, 64K; 2.6B also at 32K).
  c.train.per_device_batch = 1
  fsdp_only = {"data": 1, "fsdp": -1, "context": 1, "tensor": 1}
  context = lambda n: dict(fsdp_only, context=n)
  big = size == "2p6b"
  fork = {"layers": 48, "mapping": mapping or "interleave", "moments": "duplicate"} if big else {}
  c.phases = (
      phase(name="1a", tokens=3 * 10**12, lr=3e-4, warmup_steps=2000, batch_tokens=8 * M, batch_ramp_from=4 * M,
            batch_ramp_steps=20_000, batch_ramp_stages=4, seq_len=4096, loop_steps=8, beta=0.1,
            rope_base=10_000.0, mesh=context(2)),
      phase(name="1b", tokens=3 * 10**12, loop_steps=4, beta=0.05, upscale=fork, mesh=fsdp_only),
      phase(name="2", tokens=14 * 10**11, lr_shape="cosine", end_lr=3e-5, seq_len=16 * 1024, rope_base=40_000.0),
      phase(name="3", tokens=20 * 10**9, seq_len=64 * 1024, rope_base=1_000_000.0, mesh=context(4 if big else 2)),
      phase(name="4", tokens=300 * 10**9, lr_shape="cosine", end_lr=1e-5, seq_len=32 * 1024,
            mesh=context(2) if big else fsdp_only),
  )
  return c
