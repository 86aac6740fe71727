"""Claim b (Capo, SPEC section 6): looping adds no knowledge storage.

The same parameters at T=1 and T=4 memorise synthetic biographies; a model stores about 2 bits per
parameter either way (expected: within 10%). The world is made larger than the model can hold
(people x attributes x log2(values) bits against the parameter count), so capacity, not the data,
limits what is stored.

Bits stored = people x attributes x max(0, log2(values) - CE), CE the held-out answer CE in bits at
the last loop step (Capo's held-out questions are the training biographies' attributes). It is a
lower bound of what the model knows (Capo's own estimator also credits partial knowledge per value).

    python experiments/exp_b_capo.py [--fast] [--out runs/experiments/b_capo]
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

VARIANTS = {"T1": 1, "T4": 4}
PEOPLE, ATTRIBUTES, VALUES = 2048, 4, 16
STEPS = 3000


def config(loop_steps: int, fast: bool):
  c = common.base_config("capo", STEPS, fast=fast)
  c.data.capo_people, c.data.capo_attributes, c.data.capo_values = PEOPLE, ATTRIBUTES, VALUES
  c.train.seq_len = 64
  c.eval.num_batches = 1 if fast else 16
  vocab = 64 * math.ceil((8 + PEOPLE + ATTRIBUTES * (1 + VALUES)) / 64)
  common.tiny_model(c, vocab=vocab, hidden=32, layers=1, loop_steps=loop_steps)
  c.objective.beta = 0.1 if loop_steps > 1 else 0.0
  return c


def bits(workdir: str, cfg) -> dict:
  from loopjax.train.state import count_params
  ce_nats = common.final_eval(workdir)[f"eval_T{cfg.model.loop_steps}/ce_per_step"][-1]
  stored = PEOPLE * ATTRIBUTES * max(0.0, math.log2(VALUES) - ce_nats / math.log(2))
  params = count_params(cfg.model)
  return {"answer_ce_nats": ce_nats, "bits_stored": stored, "params": params, "bits_per_param": stored / params,
          "world_bits": PEOPLE * ATTRIBUTES * math.log2(VALUES)}


def main(argv=None) -> dict:
  args = common.parse_args(__doc__, "b_capo", argv)
  out = {}
  for name, loop_steps in VARIANTS.items():
    cfg = config(loop_steps, args.fast)
    out[name] = bits(common.train(cfg, os.path.join(args.out, name)), cfg)
  ratio = out["T4"]["bits_per_param"] / max(out["T1"]["bits_per_param"], 1e-12)
  results = {"steps": 4 if args.fast else STEPS, "fast": args.fast, "runs": out, "T4_over_T1": ratio}
  common.write_results(args.out, results)
  common.plot([os.path.join(args.out, name) for name in VARIANTS], os.path.join(args.out, "b_capo.png"))
  return results


if __name__ == "__main__":
  main()
