"""Claim b (Capo, SPEC section 6): looping adds no knowledge storage.

The same parameters at T=1 and T=4 memorise synthetic biographies (expected: the same bits per
parameter, within 10%). The claim is about capacity, so the world must hold more bits than the model
can store: 512 people x 32 attributes x 16 values = 65,536 bits against a 1-layer width-16 model with
tied embeddings (20,193 parameters, so 3.2 bits per parameter would be needed to hold it all). Each
attribute has its own 16 value tokens, so a person's own parameters (a 16-wide embedding) are far
fewer than the 128 bits to store. The budget (RESULTS.md, claim b: 8000 steps, ~1500 exposures per
person, peak LR 1e-2) is the pilot's at which T=1 storage levels off before the LR decays.

Bits stored = people x attributes x max(0, log2(values) - CE), CE the held-out answer CE in bits at
the last loop step (Capo's questions are the training biographies' attributes), at every evaluation,
so the curve shows whether storage has levelled off. It is a lower bound of what the model knows
(Capo's own estimator also credits partial knowledge per value). results.json carries the
pre-registered rule's verdict.

    python experiments/exp_b_capo.py [--fast] [--steps N] [--seeds 0,1,2] [--variants T1,T4]
        [--people 512] [--attributes 32] [--lr X] [--out runs/experiments/b_capo]
"""

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

VARIANTS = {"T1": 1, "T4": 4}
SEEDS = (0, 1, 2)
PEOPLE, ATTRIBUTES, VALUES = 512, 32, 16
HIDDEN = 16
STEPS, LR = 8000, 1e-2
BAND = (0.9, 1.1)  # the rule: T4 / T1 bits per parameter within 10%
LEVELLED, BELOW_WORLD = 0.05, 0.9  # growth over the stable phase's last fifth of the run; share of the world


def config(loop_steps: int, seed: int, fast: bool, steps: int = STEPS, people: int = PEOPLE,
           attributes: int = ATTRIBUTES, lr: float = LR):
  c = common.base_config("capo", steps, fast=fast, seed=seed)
  c.optim.lr, c.optim.end_lr = lr, 0.1 * lr  # base_config's WSD shape: decay over the last fifth to a tenth
  c.data.capo_people, c.data.capo_attributes, c.data.capo_values = people, attributes, VALUES
  c.train.batch_size = 32  # rows of three biographies (2 + 2 x attributes tokens each): ~96 biographies a step
  c.train.seq_len = 128 * math.ceil(3 * (2 + 2 * attributes) / 128)
  c.eval.num_batches = 1 if fast else 8
  vocab = 64 * math.ceil((8 + people + attributes * (1 + VALUES)) / 64)
  common.tiny_model(c, vocab=vocab, hidden=HIDDEN, layers=1, loop_steps=loop_steps)
  c.model.tie_embeddings = True
  c.objective.beta = 0.1 if loop_steps > 1 else 0.0
  return c


def curve(workdir: str, cfg) -> dict:
  """step -> bits stored, from every held-out evaluation in the run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  d, key = cfg.data, f"eval_T{cfg.model.loop_steps}/ce_per_step"
  return {r["step"]: d.capo_people * d.capo_attributes * max(0.0, math.log2(VALUES) - r[key][-1] / math.log(2))
          for r in rows if key in r}


def main(argv=None) -> dict:
  from loopjax.train.state import count_params
  import argparse
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--people", type=int, default=PEOPLE)
  parser.add_argument("--attributes", type=int, default=ATTRIBUTES)
  world, rest = parser.parse_known_args(argv)
  args = common.parse_args(__doc__, "b_capo", rest, lr=True)
  names, seeds = common.pick(args, VARIANTS, SEEDS)
  steps = args.steps or STEPS
  world_bits = world.people * world.attributes * math.log2(VALUES)
  runs = {}
  for name in names:
    for seed in seeds:
      cfg = config(VARIANTS[name], seed, args.fast, steps, world.people, world.attributes, args.lr or LR)
      workdir = os.path.join(args.out, f"{name}_s{seed}")
      common.train(cfg, workdir)
      bits = curve(workdir, cfg)
      params = count_params(cfg.model)
      final = bits[max(bits)]
      runs[f"{name}_s{seed}"] = {"variant": name, "seed": seed, "params": params, "bits_stored": final,
                                 "bits_per_param": final / params, "fraction_of_world": final / world_bits,
                                 "curve": bits, "wall_s": common.wall_seconds(workdir)}
  per_variant = {name: common.mean_spread([r["bits_per_param"] for r in runs.values() if r["variant"] == name])
                 for name in names}
  ratios = [runs[f"T4_s{s}"]["bits_per_param"] / max(runs[f"T1_s{s}"]["bits_per_param"], 1e-12)
            for s in seeds if f"T4_s{s}" in runs and f"T1_s{s}" in runs]
  results = {"steps": 4 if args.fast else steps, "fast": args.fast, "world_bits": world_bits, "runs": runs,
             "bits_per_param": per_variant, "T4_over_T1_per_seed": ratios}
  results["verdict"] = verdict(runs, ratios, world_bits)
  common.write_results(args.out, results)
  groups = {}
  for run in runs.values():
    bits = run["curve"]
    groups.setdefault(run["variant"], []).append((sorted(bits), [bits[k] for k in sorted(bits)]))
  common.plot_bands([{"title": f"bits stored ({world.people} people x {world.attributes} attributes)",
                      "ylabel": "bits", "groups": groups, "marks": [(world_bits, "the whole world"),
                                                               (BELOW_WORLD * world_bits, "rule: 90% of it")]}],
                    os.path.join(args.out, "b_capo.png"))
  return results


def stable_growth(bits: dict) -> float:
  """Growth of bits stored over the last fifth of the constant-LR phase (from 60% to 80% of the run; the
  WSD decay of the last fifth always adds a jump): bits(0.8 S) / bits(0.6 S) - 1."""
  steps = sorted(bits)
  at = lambda fraction: bits[min(steps, key=lambda s: abs(s - fraction * steps[-1]))]
  return at(0.8) / max(at(0.6), 1e-12) - 1


def verdict(runs: dict, ratios: list[float], world_bits: float) -> dict:
  """The pre-registered rule of RESULTS.md (claim b)."""
  unlevelled = sorted(n for n, r in runs.items() if stable_growth(r["curve"]) >= LEVELLED)
  near_world = sorted(n for n, r in runs.items() if r["bits_stored"] >= BELOW_WORLD * world_bits)
  out = {"not_levelled_off": unlevelled, "near_the_whole_world": near_world}
  if not ratios:
    return out
  within = [BAND[0] <= r <= BAND[1] for r in ratios]
  if unlevelled or near_world:
    out["claim"] = "not established"  # storage bound by exposures, or the world too small: not capacity
  elif all(within):
    out["claim"] = "reproduced"
  elif not BAND[0] <= sum(ratios) / len(ratios) <= BAND[1]:
    out["claim"] = "not reproduced"
  else:
    out["claim"] = "not established"
  return out


if __name__ == "__main__":
  main()
