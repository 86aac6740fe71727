"""One figure of one or more runs: losses, per-step CE, the exit distribution, accuracy and benchmarks.

Loop step t has the same colour in every panel (a sequential map: darker is shallower); run i has
the same line style in every panel, and its own colour in the panels that draw one line per run, so
several workdirs overlay (ablations) and the figure legend names them. Phase boundaries of a recipe
run are dotted vertical lines on every panel whose x axis is the training step.
"""

import math

from loopjax.plotting.runs import Run

LINESTYLES = ("-", "--", ":", "-.")
STEP_AXIS = "optimizer step"
NATS = "nats / token"


def _step_colour(t: int, max_t: int):
  """Loop step t (1-based) of at most max_t: a viridis shade, the same for a step in every panel."""
  from matplotlib import colormaps
  return colormaps["viridis"](0.85 * (t - 1) / max(max_t - 1, 1))


def _run_style(i: int) -> dict:
  from matplotlib import colormaps
  return {"color": colormaps["tab10"](i % 10), "linestyle": LINESTYLES[i % len(LINESTYLES)]}


def _mark_phases(ax, run: Run):
  for step, name in run.phase_starts:
    ax.axvline(step, color="0.5", linestyle=":", linewidth=1, gid="phase-boundary")
    ax.annotate(name, (step, 1), xycoords=("data", "axes fraction"), xytext=(2, -2), textcoords="offset points",
                va="top", fontsize=7, color="0.35")


def _label(ax, title: str, xlabel: str, ylabel: str):
  ax.set_title(title, fontsize=10)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)


def _step_legend(ax, max_t: int):
  from matplotlib.lines import Line2D
  handles = [Line2D([], [], color=_step_colour(t, max_t), label=f"step {t}") for t in range(1, max_t + 1)]
  ax.legend(handles=handles, fontsize=7, title="loop step", title_fontsize=7)


def _per_run_panel(ax, runs: list[Run], key: str, title: str, ylabel: str, only=None):
  """One line per run (`only`: a subset to draw, each keeping its run's style)."""
  for i, run in enumerate(runs):
    if only is not None and run not in only:
      continue
    ax.plot(*run.series(key), **_run_style(i))
    _mark_phases(ax, run)
  _label(ax, title, STEP_AXIS, ylabel)


def _per_step_lines(ax, i: int, steps: list[int], per_step: list[list[float]], max_t: int):
  """One line per loop step of one run: per_step holds a list of per-step values at each logged step."""
  for t in range(max(map(len, per_step), default=0)):
    xs = [s for s, v in zip(steps, per_step) if len(v) > t]
    ys = [v[t] for v in per_step if len(v) > t]
    ax.plot(xs, ys, color=_step_colour(t + 1, max_t), linestyle=_run_style(i)["linestyle"])


def _ce_panel(ax, runs: list[Run], max_t: int):
  for i, run in enumerate(runs):
    _per_step_lines(ax, i, *run.series("ce_per_step"), max_t)
    _mark_phases(ax, run)
  _label(ax, "Training cross-entropy per loop step", STEP_AXIS, f"CE ({NATS})")
  _step_legend(ax, max_t)


def _exit_panel(ax, run: Run, max_t: int):
  """The exit distribution p(t) over training as a stacked area (a changed T restarts the stack)."""
  steps, probs = run.series("exit_probs")
  width = max(map(len, probs))
  columns = [[p[t] if len(p) > t else 0.0 for p in probs] for t in range(width)]
  ax.stackplot(steps, *columns, colors=[_step_colour(t + 1, max_t) for t in range(width)],
               labels=[f"step {t + 1}" for t in range(width)])
  _mark_phases(ax, run)
  ax.set_ylim(0, 1)
  if len(steps) > 1:
    ax.set_xlim(steps[0], steps[-1])
  _label(ax, f"Exit distribution p(t): {run.label}", STEP_AXIS, "probability")
  _step_legend(ax, max_t)


def _eval_key(run: Run, name: str = "exact_match_per_step") -> str | None:
  """eval_T{T}/<name> at the trained T if it was evaluated, else at the largest T."""
  counts = [T for T in run.eval_loop_counts() if run.eval_series(f"eval_T{T}/{name}")[0]]
  if not counts:
    return None
  return f"eval_T{run.loop_steps if run.loop_steps in counts else counts[-1]}/{name}"


def _has_exit_gate(run: Run) -> bool:
  """Whether the run scores several loop steps (Loop-Residual scores only its final state)."""
  return max(map(len, run.series("exit_probs")[1]), default=0) > 1


def _eval_loss_panel(ax, runs: list[Run]):
  """Held-out loss (the exit-weighted loss at the trained T) over training, one line per run."""
  for i, run in enumerate(runs):
    key = _eval_key(run, "loss")
    if key:
      ax.plot(*run.eval_series(key), marker=".", **_run_style(i))
      _mark_phases(ax, run)
  _label(ax, "Held-out loss", STEP_AXIS, f"loss ({NATS})")


def _accuracy_panel(ax, runs: list[Run], max_t: int):
  for i, run in enumerate(runs):
    key = _eval_key(run)
    if key:
      _per_step_lines(ax, i, *run.eval_series(key), max_t)
      _mark_phases(ax, run)
  _label(ax, "Held-out exact match per loop step (teacher-forced)", STEP_AXIS, "exact match (fraction)")
  ax.set_ylim(-0.02, 1.02)
  _step_legend(ax, max_t)


def _depth_panel(ax, runs: list[Run]):
  """Exact match of Q-exit decoding against the mean loop steps it ran (q = 0.1..0.9, then full depth)."""
  markers = "osd^v<>"
  for i, run in enumerate(runs):
    for j, T in enumerate(run.gen_loop_counts()):
      depth = run.gen[f"gen_T{T}/mean_depth_q"] + [T]
      em = run.gen[f"gen_T{T}/exact_match_q"] + [run.gen[f"gen_T{T}/exact_match_full_depth"]]
      ax.plot(depth, em, marker=markers[j % len(markers)], color=_run_style(i)["color"],
              linestyle=_run_style(i)["linestyle"], label=f"{run.label}, T={T}")
  _label(ax, "Exact match vs average depth (Q-exit decoding)", "mean loop steps run", "exact match (fraction)")
  ax.legend(fontsize=7)


def _harness_panel(ax, runs: list[Run]):
  """lm-eval accuracy against loop steps: a line over T per logged step (earlier steps fainter), and the
  Q-exit thresholds as crosses at the mean loop steps they ran; one marker per task and metric."""
  markers = "osd^v<>"
  names = sorted({name for r in runs for row in r.harness for name in r.harness_curves(row)})
  for i, run in enumerate(runs):
    for j, row in enumerate(run.harness):
      alpha = 0.25 + 0.75 * (j + 1) / len(run.harness)
      newest = j == len(run.harness) - 1
      for name, (Ts, at_T, steps, at_q) in run.harness_curves(row).items():
        ax.plot(Ts, at_T, marker=markers[names.index(name) % len(markers)], alpha=alpha, **_run_style(i),
                label=f"{run.label}: {name} (step {row['step']})" if newest else None)
        ax.plot(steps, at_q, "x", color=_run_style(i)["color"], alpha=alpha)
  _label(ax, "Benchmarks (lm-eval) vs loop steps; x: Q-exit", "loop steps T (Q-exit: mean steps run)",
         "accuracy (fraction)")
  ax.legend(fontsize=7)


def panel_count(runs: list[Run]) -> int:
  gated = [r for r in runs if _has_exit_gate(r)]
  return (2 + bool(gated) + len(gated) + any(_eval_key(r, "loss") for r in runs) + any(_eval_key(r) for r in runs)
          + any(r.gen for r in runs) + any(r.harness for r in runs))


def draw(runs: list[Run], ncols: int = 2):
  """The matplotlib Figure of `runs` (not shown or saved), one titled axis per panel."""
  from matplotlib.figure import Figure
  from matplotlib.lines import Line2D
  max_t = max(max(r.loop_steps for r in runs), *(max(r.eval_loop_counts(), default=1) for r in runs))
  n = panel_count(runs)
  nrows = math.ceil(n / ncols)
  fig = Figure(figsize=(6 * ncols, 3.4 * nrows + 0.6), layout="constrained")
  axes = iter(fig.subplots(nrows, ncols, squeeze=False).flat)
  _per_run_panel(next(axes), runs, "loss", "Training loss (objective, incl. -beta H)", f"loss ({NATS})")
  _ce_panel(next(axes), runs, max_t)
  gated = [r for r in runs if _has_exit_gate(r)]  # exit panels only where there is a distribution to show
  if gated:
    _per_run_panel(next(axes), runs, "expected_exit_step", "Expected exit step", "loop step", only=gated)
  for run in gated:
    _exit_panel(next(axes), run, max_t)
  if any(_eval_key(r, "loss") for r in runs):
    _eval_loss_panel(next(axes), runs)
  if any(_eval_key(r) for r in runs):
    _accuracy_panel(next(axes), runs, max_t)
  if any(r.gen for r in runs):
    _depth_panel(next(axes), runs)
  if any(r.harness for r in runs):
    _harness_panel(next(axes), runs)
  for ax in axes:
    fig.delaxes(ax)
  handles = [Line2D([], [], label=r.label, **_run_style(i)) for i, r in enumerate(runs)]
  fig.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 4), fontsize=9)
  return fig


def save(fig, path: str, dpi: int = 90):
  """Writes the figure; the format follows the extension (.png or .svg)."""
  fig.savefig(path, dpi=dpi)
