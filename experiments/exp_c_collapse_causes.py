"""Claim c, diagnosis: why does beta = 0 collapse the exit distribution onto step 1 here (Ouro: step T)?

Each run is the beta = 0 run of exp_c_entropy.py (smoke model 2 layers x T=4 on multi-hop QA, 600
steps, WSD LR 3e-3, seed 0) with exactly one thing changed:

  base        nothing (beta 0)
  gate_bias   the exit gate's bias starts at -2 instead of 0 (model.gate_bias_init), so the initial
              p(t) is (0.12, 0.10, 0.09, 0.68) instead of (0.5, 0.25, 0.125, 0.125)
  lr3e-4      the whole LR schedule x 0.1 (peak 3e-4, end 3e-5)
  warm_start  beta 0.1 for the first 300 steps, then beta 0 (a 3-phase recipe with the same LR shape)
  hops4       multi-hop with 1..4 hops (eval: held-out 4-hop questions) instead of 1..3
  lm_uniform  stop-gradient choice (objective.lm_weights = "uniform"): the LM's gradient weights
              every step's CE by 1/T, the gate's sees sum_t p(t) sg(CE_t) (Ouro lets the gate's p(t)
              weight the LM's gradient too). Loss value unchanged.

Numbers: final p(t) and entropy, training CE per step early (first log rows) and at the end, the
step p(1) first exceeded 0.9, held-out exact match per step.

    python experiments/exp_c_collapse_causes.py [--fast] [--out runs/experiments/c_collapse_causes]
        [--seeds 0,1,2] [--variants base,lm_uniform]
"""

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

STEPS = 600
VARIANTS = ("base", "gate_bias", "lr3e-4", "warm_start", "hops4", "lm_uniform")
GATE_BIAS = -2.0


def config(name: str, fast: bool, seed: int = 0):
  from loopjax.phases import phase
  c = common.base_config("multihop", STEPS, fast=fast, seed=seed)
  common.tiny_model(c, vocab=128)
  c.objective.prior, c.objective.beta = "uniform", 0.0
  if name == "lr3e-4":
    c.optim.lr, c.optim.end_lr = 3e-4, 3e-5
  elif name == "gate_bias":
    c.model.gate_bias_init = GATE_BIAS
  elif name == "lm_uniform":
    c.objective.lm_weights = "uniform"
  elif name == "hops4":
    c.data.multihop_max_hops = 4
  elif name == "warm_start":  # the WSD schedule of base_config, as phases: beta 0.1 for the first half
    o, half, decay = c.optim, c.train.steps // 2, max(1, c.optim.decay_steps)
    c.phases = (phase(name="beta0.1", steps=half, beta=0.1, lr=o.lr, warmup_steps=o.warmup_steps),
                phase(name="beta0", steps=max(1, half - decay), beta=0.0),
                phase(name="decay", steps=decay, lr_shape="linear", end_lr=o.end_lr))
  return c


def summary(workdir: str) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  train = sorted({r["step"]: r for r in rows if "exit_probs" in r}.values(), key=lambda r: r["step"])
  ev = common.final_eval(workdir)
  T = len(train[-1]["exit_probs"])
  probs = train[-1]["exit_probs"]
  locked = next((r["step"] for r in train if r["exit_probs"][0] > 0.9), None)
  return {"exit_probs": probs, "exit_entropy": -sum(p * math.log(p) for p in probs if p > 0),
          "expected_exit_step": train[-1]["expected_exit_step"], "p1_above_0.9_at_step": locked,
          "exit_probs_first": train[0]["exit_probs"], "train_ce_per_step_by_step": {
              str(r["step"]): r["ce_per_step"] for r in train[:6] + train[-1:]},
          "eval_exact_match_per_step": ev[f"eval_T{T}/exact_match_per_step"],
          "eval_ce_per_step": ev[f"eval_T{T}/ce_per_step"],
          "eval_exact_match_q_exit": ev[f"eval_T{T}/exact_match_q_exit"]}


def main(argv=None) -> dict:
  args = common.parse_args(__doc__, "c_collapse_causes", argv)
  names, seeds = common.pick(args, VARIANTS)
  workdirs, wall = {}, {}  # (name, seed) -> ...; seed 0 in OUT/<name>, seed N in OUT/seed<N>/<name>
  for seed in seeds:
    for name in names:
      workdir = os.path.join(args.out, f"seed{seed}" if seed else "", name)
      workdirs[name, seed] = common.train(config(name, args.fast, seed), workdir)
      wall[name, seed] = common.wall_seconds(workdir)
  results = {"steps": 4 if args.fast else STEPS, "fast": args.fast, "seeds": seeds,
             "runs": {f"{name}_s{seed}": dict(summary(w), wall_s=wall[name, seed]) for (name, seed), w in workdirs.items()}}
  common.write_results(args.out, results)
  common.plot([w for (_, seed), w in workdirs.items() if seed == seeds[0]], os.path.join(args.out, "c_collapse_causes.png"))
  if len(seeds) > 1:
    groups = {name: [common.train_curve(workdirs[name, seed], "expected_exit_step") for seed in seeds] for name in names}
    common.plot_bands([{"title": "expected exit step (training)", "ylabel": "E[exit]", "groups": groups,
                        "marks": [(2.0, "rule: lm_uniform > 2")]}], os.path.join(args.out, "c_collapse_seeds.png"))
  return results


if __name__ == "__main__":
  main()
