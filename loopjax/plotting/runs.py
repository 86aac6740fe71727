"""A workdir's logs as series to plot: metrics.jsonl rows split by kind, phases.jsonl boundaries.

metrics.jsonl holds four kinds of rows, told apart by their keys: training rows (`loss`,
`ce_per_step`, `exit_probs`, ...), held-out evaluation rows (`eval_T{T}/<name>`, from training's eval
hook or `loopjax eval --output`), decoding rows (`gen_T{T}/<name>`, from `loopjax eval --generate`) and
benchmark rows (`harness/<task>/<metric>/T<t>` and `/q<q>`, from training's harness hook or `loopjax eval
--harness`).
A resumed run may have logged a step twice; the later line wins, as in TensorBoard.
"""

import dataclasses
import json
import os


HARNESS_ACCURACY = ("acc", "acc_norm", "exact_match")  # benchmark metrics drawn against loop steps


class PlotError(ValueError):
  """A workdir has nothing to plot (no metrics.jsonl, or no training rows in it)."""


@dataclasses.dataclass
class Run:
  label: str
  train: list[dict]  # training rows, by step
  evals: list[dict]  # rows with eval_T*/ keys, by step
  gen: dict | None  # the newest row with gen_T*/ keys
  harness: list[dict]  # rows with harness/ keys, by step
  phase_starts: list[tuple[int, str]]  # (step, phase name) of every phase after the first

  def series(self, key: str) -> tuple[list[int], list]:
    """(steps, values) of a training metric, skipping rows without it."""
    rows = [r for r in self.train if key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]

  def eval_series(self, key: str) -> tuple[list[int], list]:
    rows = [r for r in self.evals if key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]

  @property
  def loop_steps(self) -> int:
    """The trained loop count: the length of the newest per-step CE list."""
    _, ce = self.series("ce_per_step")
    return len(ce[-1]) if ce else 1

  def eval_loop_counts(self) -> list[int]:
    """Every T evaluated during the run, ascending."""
    return sorted({int(k.split("/")[0][len("eval_T"):]) for r in self.evals for k in r if k.startswith("eval_T")})

  def harness_curves(self, row: dict) -> dict[str, tuple[list[float], list[float], list[float], list[float]]]:
    """{"<task> <metric>": (T's, values at full depth, mean steps run under Q-exit, values)} of one
    benchmark row, for the accuracy-like metrics (HARNESS_ACCURACY) it holds."""
    curves = {}
    for key, value in row.items():
      parts = key.split("/")
      if len(parts) != 4 or parts[0] != "harness" or parts[2] not in HARNESS_ACCURACY:
        continue
      _, task, metric, depth = parts
      Ts, at_T, steps, at_q = curves.setdefault(f"{task} {metric}", ([], [], [], []))
      if depth.startswith("T"):
        Ts.append(int(depth[1:]))
        at_T.append(value)
      elif f"harness/{task}/mean_exit_step/{depth}" in row:
        steps.append(row[f"harness/{task}/mean_exit_step/{depth}"])
        at_q.append(value)
    return curves

  def gen_loop_counts(self) -> list[int]:
    if not self.gen:
      return []
    return sorted(int(k.split("/")[0][len("gen_T"):]) for k in self.gen if k.endswith("/exact_match_q"))


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _by_step(rows: list[dict]) -> list[dict]:
  """One row per step (the last logged), ascending."""
  return sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])


def _phase_starts(rows: list[dict]) -> list[tuple[int, str]]:
  """The first step of every phase but the first: where a plot draws a boundary."""
  starts = {(r["start_step"], r["phase"]) for r in rows if r.get("event") == "start" and r.get("start_step", 0) > 0}
  return sorted(starts)


def labels(workdirs: list[str]) -> list[str]:
  """Each workdir's last path component, or the whole path where two would read the same."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return [n if names.count(n) == 1 else os.path.normpath(w) for n, w in zip(names, workdirs)]


def load(workdir: str, label: str) -> Run:
  """The run in `workdir`; PlotError if it has logged no training step."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows = _read_jsonl(path)
  train = _by_step([r for r in rows if "loss" in r])
  if not train:
    raise PlotError(f"{path}: no training rows to plot. Fix: pass the workdir of a run that has logged at "
                    "least one step (train.log_every)")
  evals = _by_step([r for r in rows if any(k.startswith("eval_T") for k in r)])
  gens = [r for r in rows if any(k.startswith("gen_T") for k in r)]
  harness = _by_step([r for r in rows if any(k.startswith("harness/") for k in r)])
  phases = _read_jsonl(os.path.join(workdir, "phases.jsonl"))
  return Run(label, train, evals, gens[-1] if gens else None, harness, _phase_starts(phases))


def load_all(workdirs: list[str]) -> list[Run]:
  return [load(w, label) for w, label in zip(workdirs, labels(workdirs))]
