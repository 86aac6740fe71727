"""Claim d (Ng & Wang, SPEC section 4): a Loop-Residual block of 6 layers looped 6 times is close to
12 layers run once, and better than the same 6 layers run once, in validation loss at equal tokens.

The corpus every machine has: this Python's standard library sources (the top-level `*.py` files),
one document per file, byte tokenizer, prepared with `loopjax prepare`; every 10th file (sorted by
name) is held out for validation, so validation is unseen files, not unseen lines of seen files.
The models are GPT-2 style (`model.kind = loop_residual`) at toy width, each at its best peak LR from
exp_d_diagnose.py's sweep (6x6: 3e-4; 12x1 and 6x1: 1e-3); 6x6_scaled is 6x6 with its residual
branches' output projections scaled over the unrolled depth (model.depth_scaled_init), the change the
diagnosis found to help. `--lr` gives every model one LR instead (the first run: --lr 1e-3 --steps 800).

    python experiments/exp_d_loop_residual.py [--fast] [--steps N] [--seeds 0,1,2] [--lr X]
        [--variants 6x6_scaled,12x1,6x1,6x6] [--out runs/experiments/d_loop_residual]

results.json carries the pre-registered rule's verdict (RESULTS.md, claim d) for the arms that ran.
"""

import glob
import json
import os
import sys
import sysconfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

VARIANTS = {"6x6": (6, 6), "12x1": (12, 1), "6x1": (6, 1)}  # name -> (layers, loops)
BEST_LR = {"6x6": 3e-4, "6x6_scaled": 3e-4, "12x1": 1e-3, "6x1": 1e-3}  # exp_d_diagnose.py's sweep
PRIMARY = ("6x6_scaled", "12x1", "6x1")  # the pre-registered arms (RESULTS.md); 6x6 on request
CLOSE_MARGIN = 0.03  # nats/byte: "close to 12x1" (the rule of RESULTS.md)
SEEDS = (0, 1, 2)
STEPS = 800
HELD_OUT_EVERY = 10


def stdlib_files(fast: bool) -> list[str]:
  """The standard library's top-level sources that are valid UTF-8, sorted (a handful with --fast)."""
  paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
  kept = []
  for path in paths:
    try:
      with open(path, encoding="utf-8") as f:
        f.read()
    except UnicodeDecodeError:
      continue
    kept.append(path)
  return kept[:2 * HELD_OUT_EVERY] if fast else kept


def prepare(out: str, fast: bool) -> tuple[str, str]:
  """(train corpus dir, validation corpus dir), prepared once under OUT/data."""
  from loopjax.cli import run as cli
  files = stdlib_files(fast)
  splits = {"train": [p for i, p in enumerate(files) if i % HELD_OUT_EVERY],
            "val": [p for i, p in enumerate(files) if i % HELD_OUT_EVERY == 0]}
  dirs = []
  for split, paths in splits.items():
    source, target = os.path.join(out, "data", f"{split}.jsonl"), os.path.join(out, "data", split)
    os.makedirs(os.path.dirname(source), exist_ok=True)
    lines = []
    for path in paths:
      with open(path, encoding="utf-8") as src:
        lines.append(json.dumps({"text": src.read(), "file": os.path.basename(path)}) + "\n")
    if not _holds(source, "".join(lines)):  # rewriting it would change its mtime, and prepare would refuse
      with open(source, "w") as f:         # the corpus it made as one of other inputs
        f.writelines(lines)
    if cli(["prepare", source, "--output", target, "--tokenizer", "byte", "--text_field", "text"]) != 0:
      raise SystemExit(f"loopjax prepare failed for {source}")
    dirs.append(target)
  return dirs[0], dirs[1]


def _holds(path: str, text: str) -> bool:
  if not os.path.exists(path):
    return False
  with open(path, encoding="utf-8") as f:
    return f.read() == text


def config(layers: int, loops: int, train_dir: str, val_dir: str, fast: bool, seed: int = 0, steps: int = STEPS):
  c = common.base_config(train_dir, steps, fast=fast, seed=seed)
  common.tiny_model(c, vocab=320, hidden=64, layers=layers, loop_steps=loops)
  m = c.model
  m.kind, m.num_kv_heads, m.mlp_dim, m.tie_embeddings, m.max_positions = "loop_residual", 4, 256, True, 128
  c.data.packing, c.data.num_shards = "concat", 1  # one shard: a few held-out files fill every batch
  c.objective.beta = 0.0
  c.optim.lr = 1e-3
  c.eval.source, c.eval.num_batches = val_dir, 1 if fast else 16
  return c


def variant_config(name: str, seed: int, lr: float, train_dir: str, val_dir: str, fast: bool, steps: int):
  """`name` from BEST_LR at peak LR `lr` (end 0.3 x lr, as the sweep): 6x6_scaled is 6x6 with depth_scaled_init."""
  layers, loops = VARIANTS[name.removesuffix("_scaled")]
  c = config(layers, loops, train_dir, val_dir, fast, seed, steps)
  c.optim.lr, c.optim.end_lr = lr, 0.3 * lr
  c.model.depth_scaled_init = name.endswith("_scaled")
  return c


def main(argv=None) -> dict:
  args = common.parse_args(__doc__, "d_loop_residual", argv, lr=True)
  names, seeds = common.pick(args, BEST_LR, SEEDS, default=PRIMARY)
  steps = args.steps or STEPS
  train_dir, val_dir = prepare(args.out, args.fast)
  runs, curves = {}, {}
  for name in names:
    for seed in seeds:
      cfg = variant_config(name, seed, args.lr or BEST_LR[name], train_dir, val_dir, args.fast, steps)
      workdir = os.path.join(args.out, f"{name}_s{seed}")
      common.train(cfg, workdir)
      key = f"eval_T{cfg.model.loop_steps}/ce_per_step"
      runs[f"{name}_s{seed}"] = {"variant": name, "seed": seed, "lr": cfg.optim.lr, "wall_s": common.wall_seconds(workdir),
                                 "val_loss_nats_per_byte": common.final_eval(workdir)[key][-1]}
      curves.setdefault(name, []).append(common.eval_curve(workdir, key))
  losses = {name: [r["val_loss_nats_per_byte"] for r in runs.values() if r["variant"] == name] for name in names}
  t = cfg.train
  results = {"steps": t.steps, "fast": args.fast, "tokens_per_run": t.steps * t.batch_size * t.seq_len, "runs": runs,
             "val_loss": {name: dict(common.mean_spread(v), per_seed=v) for name, v in losses.items()},
             "gain_over_last_fifth": {name: common.late_gain(c) for name, c in curves.items()}}
  results["verdict"] = verdict(results["val_loss"], results["gain_over_last_fifth"])
  common.write_results(args.out, results)
  deep = results["val_loss"].get("12x1")
  marks = [(deep["mean"] + CLOSE_MARGIN, f"rule: 12x1 mean + {CLOSE_MARGIN}")] if deep else []
  common.plot_bands([{"title": "held-out loss (unseen stdlib files)", "ylabel": "nats / byte", "groups": curves,
                      "marks": marks}], os.path.join(args.out, "d_loop_residual.png"))
  return results


def verdict(loss: dict, gains: dict) -> dict:
  """The pre-registered rule of RESULTS.md (claim d), applied to the final validation losses (lower is better)."""
  looped, deep, shallow = (loss.get(n) for n in PRIMARY)
  out = {"still_improving": sorted(n for n, g in gains.items() if g < -0.02)}
  if looped and deep:
    out["close_to_12x1"] = "reproduced" if looped["mean"] <= deep["mean"] + CLOSE_MARGIN else "not reproduced"
  if looped and shallow:
    wins = all(a < b for a, b in zip(looped["per_seed"], shallow["per_seed"]))
    separated = looped["ci95"][1] < shallow["ci95"][0]
    out["beats_6x1"] = ("reproduced" if wins and separated else
                        "not reproduced" if looped["mean"] >= shallow["mean"] else "not established")
  return out


if __name__ == "__main__":
  main()
