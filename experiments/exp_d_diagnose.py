"""Claim d, diagnosis: why did Loop-Residual 6x6 train worst? A per-model LR sweep and the residual stream.

The configs of exp_d_loop_residual.py (same data, width, batch) for 400 steps at LR 3e-4, 1e-3 and
3e-3 (WSD, end LR 0.3 x peak as exp_d's 1e-3 -> 3e-4) for 6x6, 12x1 and 6x1: final validation CE,
the gradient norm logged in training (clip is 1.0), and the residual stream's RMS (||x|| / sqrt(D),
mean over tokens of one held-out batch) after every layer application, at initialisation and after
training at 1e-3 and at the model's best LR, computed by running the Loop-Residual forward by hand on
the restored parameters. Then one controlled 6x6 run at its best LR whose residual-branch output
projections (wo, w_proj) start at std 0.02 / sqrt(2 x layers x loops), GPT-2's depth scaling counted
over the unrolled depth (model.depth_scaled_init).
`--best` then trains each model at its best LR for exp_d's 800 steps.

    python experiments/exp_d_diagnose.py [--fast] [--best] [--out runs/experiments/d_diagnose]
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import exp_d_loop_residual as exp_d  # noqa: E402

STEPS = 400
LRS = (3e-4, 1e-3, 3e-3)


def config(layers, loops, lr, steps, train_dir, val_dir, fast):
  c = exp_d.config(layers, loops, train_dir, val_dir, fast)
  c.train.steps = 4 if fast else steps
  c.train.log_every = 1 if fast else 5
  c.optim.lr, c.optim.end_lr = lr, 0.3 * lr
  c.optim.warmup_steps, c.optim.decay_steps = min(20, c.train.steps // 2), c.train.steps // 5
  c.eval.every_steps = max(1, c.train.steps // 10)
  return c


def grad_norms(workdir: str) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  g = [r["grad_norm"] for r in rows if "grad_norm" in r]
  tail = g[len(g) // 2:]
  return {"first": g[0], "max": max(g), "median_second_half": statistics.median(tail),
          "frac_clipped": sum(x > 1.0 for x in g) / len(g)}


def residual_rms(cfg, workdir: str | None, val_dir: str) -> list[float]:
  """RMS of the residual stream after the embedding and after every layer application (1 + loops x layers)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from loopjax import checkpoint, storage
  from loopjax.model import attention, build_model, layers
  from loopjax.model.loop_residual import LN_EPS
  from loopjax.train.state import model_graph
  m = cfg.model
  if workdir is None:
    model = build_model(m, nnx.Rngs(cfg.train.seed))
  else:
    params = checkpoint.restore_params(str(storage.checkpoints_dir(workdir))).items["params"]
    model = nnx.merge(model_graph(m)[0], jax.tree.map(np.asarray, params))
  with open(os.path.join(os.path.dirname(val_dir), "val.jsonl")) as f:
    text = "".join(json.loads(line)["text"] for line in f)
  S = cfg.train.seq_len
  data = np.frombuffer(text.encode("utf-8"), np.uint8)[:8 * S].astype(np.int32).reshape(8, S)
  tokens = jnp.asarray(data)
  mask = attention.model_mask(m, None, 1)
  x = jnp.take(model.wte[...], tokens, axis=0) + model.wpe[...][None, :S]
  block = model.block.stacked()

  def rms(v):
    return float(jnp.mean(jnp.sqrt(jnp.mean(v * v, axis=-1))))

  out = [rms(x)]
  for _ in range(m.loop_steps):
    for i in range(m.num_layers):
      x = layers.gpt2_layer(jax.tree.map(lambda a, i=i: a[i], block), x, mask, eps=LN_EPS, dtype=jnp.float32)
      out.append(rms(x))
  return out


def main(argv=None) -> dict:
  import argparse
  from loopjax.model.loop_residual import output_init_scale
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--best", action="store_true")
  extra, rest = parser.parse_known_args(argv)
  args = common.parse_args(__doc__, "d_diagnose", rest)
  train_dir, val_dir = exp_d.prepare(args.out, args.fast)
  runs = {}
  for name, (layers, loops) in exp_d.VARIANTS.items():
    for lr in LRS[1:2] if args.fast else LRS:  # --fast: exp_d's LR alone (the sweep's code path, 3x cheaper)
      cfg = config(layers, loops, lr, STEPS, train_dir, val_dir, args.fast)
      workdir = os.path.join(args.out, f"{name}_lr{lr:g}")
      common.train(cfg, workdir)
      runs[f"{name}_lr{lr:g}"] = {"model": name, "lr": lr, "wall_s": common.wall_seconds(workdir),
                                  "val_loss_nats_per_byte": common.final_eval(workdir)[f"eval_T{loops}/ce_per_step"][-1],
                                  "grad_norm": grad_norms(workdir)}
  best, norms, final = {}, {}, {}
  for name, (layers, loops) in exp_d.VARIANTS.items():
    mine = {k: r for k, r in runs.items() if r["model"] == name}
    best[name] = min(mine.values(), key=lambda r: r["val_loss_nats_per_byte"])["lr"]
    cfg = config(layers, loops, best[name], STEPS, train_dir, val_dir, args.fast)
    norms[name] = {"init": residual_rms(cfg, None, val_dir),
                   **{f"lr{lr:g}": residual_rms(cfg, os.path.join(args.out, f"{name}_lr{lr:g}"), val_dir)
                      for lr in sorted({1e-3, best[name]})}}
  layers, loops = exp_d.VARIANTS["6x6"]
  cfg = config(layers, loops, best["6x6"], STEPS, train_dir, val_dir, args.fast)
  cfg.model.depth_scaled_init = True
  factor = output_init_scale(cfg.model)
  workdir = os.path.join(args.out, f"6x6_scaled_lr{best['6x6']:g}")
  common.train(cfg, workdir)
  norms["6x6_scaled"] = {"init": residual_rms(cfg, None, val_dir),
                         f"lr{best['6x6']:g}": residual_rms(cfg, workdir, val_dir)}
  runs["6x6_scaled"] = {"model": "6x6", "lr": best["6x6"], "output_init_factor": factor,
                        "wall_s": common.wall_seconds(workdir), "grad_norm": grad_norms(workdir),
                        "val_loss_nats_per_byte": common.final_eval(workdir)[f"eval_T{loops}/ce_per_step"][-1]}
  for name, (layers, loops) in exp_d.VARIANTS.items():
    if extra.best:
      cfg = config(layers, loops, best[name], exp_d.STEPS, train_dir, val_dir, args.fast)
      workdir = os.path.join(args.out, f"{name}_best_{exp_d.STEPS}")
      common.train(cfg, workdir)
      final[name] = {"lr": best[name], "wall_s": common.wall_seconds(workdir),
                     "val_loss_nats_per_byte": common.final_eval(workdir)[f"eval_T{loops}/ce_per_step"][-1]}
  results = {"steps": 4 if args.fast else STEPS, "fast": args.fast, "runs": runs, "best_lr": best,
             "residual_rms_per_layer_application": norms, "best_lr_runs": final}
  common.write_results(args.out, results)
  common.plot([os.path.join(args.out, f"{name}_lr{best[name]:g}") for name in exp_d.VARIANTS]
              + [os.path.join(args.out, f"6x6_scaled_lr{best['6x6']:g}")],
              os.path.join(args.out, "d_diagnose.png"))
  return results


if __name__ == "__main__":
  main()
