"""What every experiment script shares: flags, training a config into a workdir, final numbers, plots.

Each script builds its configs in code, trains each with `loopjax.train.driver.train` (so a re-run
resumes finished or interrupted runs instead of starting over), reads the final held-out evaluation
from the workdir's metrics.jsonl, and writes OUT/results.json and OUT/*.png. `--fast` runs a few
steps of every config: the tests run it so the scripts cannot rot; its numbers mean nothing.
"""

import argparse
import json
import os
import statistics

from loopjax.cli import runtime
from loopjax.config import default_config

runtime.skip_absent_tpu()  # as the CLI does, before any backend starts: no libtpu errors, no XLA:CPU abort
runtime.patient_cpu_collectives()  # when a collective's devices meet > 60 s apart on busy cores


def parse_args(doc: str, name: str, argv=None, *, lr: bool = False) -> argparse.Namespace:
  """The flags every experiment takes; `lr`: also --lr (scripts whose runs share one peak LR setting)."""
  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--fast", action="store_true", help="a few steps per run: checks the script, not the claim")
  parser.add_argument("--out", default=os.path.join("runs", "experiments", name), help="workdirs, JSON and plots")
  parser.add_argument("--steps", type=int, default=0, help="training steps per run (0: the script's budget)")
  parser.add_argument("--seeds", default="", help="comma-separated seeds (empty: the script's)")
  parser.add_argument("--variants", default="", help="comma-separated subset of the script's runs (empty: all)")
  if lr:
    parser.add_argument("--lr", type=float, default=0.0, help="one peak LR for every run (0: the script's)")
  return parser.parse_args(argv)


def pick(args, variants, seeds=(0,), default=None):
  """The runs `args` asks for: (variant names, seeds), the script's own (`default`, else every one of
  `variants`) where a flag is empty."""
  names = [v for v in args.variants.split(",") if v] or list(default or variants)
  unknown = sorted(set(names) - set(variants))
  if unknown:
    raise SystemExit(f"--variants: unknown {unknown}; this script runs {list(variants)}")
  chosen = [int(s) for s in args.seeds.split(",") if s] or list(seeds)
  return names, (chosen[:1] if args.fast else chosen)


def tiny_model(cfg, *, vocab: int, hidden: int = 64, layers: int = 2, loop_steps: int = 4):
  """The smoke config's model shape (configs/smoke.py): 4 heads of 16, 2 KV heads, MLP 2.5x."""
  m = cfg.model
  m.vocab_size, m.hidden_size, m.num_layers, m.loop_steps = vocab, hidden, layers, loop_steps
  m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 4, 2, hidden // 4, hidden * 5 // 2
  m.remat = "none"  # nothing to save at this size, and it compiles faster


def base_config(source: str, steps: int, *, fast: bool, seed: int = 0):
  """A run on `source` for `steps` steps (4 with --fast), evaluated 10 times, WSD schedule as smoke."""
  c = default_config()
  steps = 4 if fast else steps
  c.data.source, c.train.seed = source, seed
  c.train.steps, c.train.batch_size, c.train.seq_len = steps, 8, 128
  c.train.log_every, c.train.progress = max(1, steps // 50), False
  c.optim.lr, c.optim.schedule, c.optim.end_lr = 3e-3, "wsd", 3e-4
  c.optim.warmup_steps, c.optim.decay_steps = min(20, steps // 2), steps // 5
  c.eval.every_steps, c.eval.num_batches = max(1, steps // 10), 1 if fast else 4
  c.checkpoint.every_steps, c.checkpoint.keep = 0, 1
  return c


def train(cfg, workdir: str) -> str:
  """Trains (or resumes) `cfg` in `workdir`; the workdir."""
  from loopjax.train.driver import train as run
  print(f"== {workdir}", flush=True)
  if run(cfg, workdir).preempted:  # saved; nothing to score yet
    raise SystemExit(f"{workdir}: stopped by a signal after saving; run the same command again to resume it")
  return workdir


def wall_seconds(workdir: str) -> float:
  """The run's training wall time over all its sessions: the sum of phases.jsonl's end and preempted
  lines (a re-run that only collects a finished run's numbers adds none)."""
  with open(os.path.join(workdir, "phases.jsonl")) as f:
    events = [json.loads(line) for line in f if line.strip()]
  return round(sum(e["wall_seconds"] for e in events if e["event"] in ("end", "preempted")), 1)


def final_eval(workdir: str) -> dict:
  """The last held-out evaluation row of a run, keys without their step."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  evals = [r for r in rows if any(k.startswith("eval_T") for k in r)]
  return {k: v for k, v in evals[-1].items() if k != "step"}


def mean_spread(values: list[float]) -> dict:
  """Mean, sample standard deviation (0 for one value), min, max, and the 95% t-interval of the mean."""
  from scipy import stats
  mean, n = statistics.fmean(values), len(values)
  spread = statistics.stdev(values) if n > 1 else 0.0
  half = float(stats.t.ppf(0.975, n - 1)) * spread / n ** 0.5 if n > 1 else float("inf")
  return {"mean": mean, "std": spread, "min": min(values), "max": max(values), "n": n,
          "ci95": [mean - half, mean + half]}


def write_results(out: str, results: dict):
  path = os.path.join(out, "results.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  print(json.dumps(results, indent=2))
  print(f"wrote {path}")


def plot(workdirs: list[str], path: str):
  """The `loopjax plot` figure of `workdirs`, small enough for RESULTS.md."""
  from loopjax.cli.plot import plot as draw
  draw(workdirs, path, dpi=60)
  print(f"wrote {path}")


def train_curve(workdir: str, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of a training metric over the run."""
  from loopjax.plotting.runs import load
  return load(workdir, "").series(key)


def eval_curve(workdir: str, key: str, index: int = -1) -> tuple[list[int], list[float]]:
  """(steps, values) of a held-out metric over training; `index` picks one loop step of a per-step list."""
  from loopjax.plotting.runs import load
  steps, values = load(workdir, "").eval_series(key)
  return steps, [v[index] if isinstance(v, list) else v for v in values]


def late_gain(curves) -> float:
  """Mean over seeds of (final value - value at 4/5 of the run), from (steps, values) curves: is a model
  still improving? (Positive for a rising quantity, negative for a falling loss.)"""
  gains = []
  for steps, values in curves:
    at = dict(zip(steps, values))
    earlier = min(steps, key=lambda s: abs(s - 0.8 * steps[-1]))
    gains.append(at[steps[-1]] - at[earlier])
  return sum(gains) / len(gains)


def plot_bands(panels: list[dict], path: str):
  """One panel per dict {title, ylabel, groups: {label: [(steps, values) per seed]}, marks: [(y, text)]}.

  Each group is drawn as its seed mean with a band from the seeds' min to max (the spread three seeds
  can show); `marks` draws the decision rule's thresholds as dotted lines.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
  for ax, panel in zip(axes[0], panels):
    for label, curves in panel["groups"].items():
      steps = sorted(set.intersection(*(set(s) for s, _ in curves)))
      table = np.array([[dict(zip(s, v))[x] for x in steps] for s, v in curves])
      line, = ax.plot(steps, table.mean(axis=0), label=f"{label} (n={len(curves)})")
      ax.fill_between(steps, table.min(axis=0), table.max(axis=0), color=line.get_color(), alpha=0.2)
    for (y, text), style in zip(panel.get("marks", ()), (":", "--", "-.")):
      ax.axhline(y, color="gray", linestyle=style, label=text)
    ax.set(title=panel["title"], xlabel="step", ylabel=panel["ylabel"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=60)
  plt.close(fig)
  print(f"wrote {path}")
