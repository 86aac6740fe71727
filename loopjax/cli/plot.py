"""Plot runs: loopjax plot WORKDIR [WORKDIR ...] [--output FILE.png|.svg] (needs the `plot` extra).

Draws, from each workdir's metrics.jsonl and phases.jsonl: the training loss and the CE of every loop
step over training, the exit distribution over training (stacked area, one panel per run), the
expected exit step and, when logged, held-out exact match per loop step (--config.eval.every_steps on
a synthetic task) and exact match vs average depth (`loopjax eval --generate`). Several workdirs are
overlaid, one line style each; phase boundaries of a recipe run are dotted lines.
"""

import importlib.util
import os

from loopjax.plotting.runs import PlotError

FORMATS = (".png", ".svg")


def add_arguments(parser):
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="run directories (each with metrics.jsonl)")
  parser.add_argument("--output", default="",
                      help="the figure file, .png or .svg (default: WORKDIR/plot.png of the first workdir)")
  parser.add_argument("--dpi", type=int, default=90, help="resolution of a .png")


def run(args) -> int:
  output = args.output or os.path.join(args.workdirs[0], "plot.png")
  if os.path.splitext(output)[1].lower() not in FORMATS:
    raise PlotError(f"--output {output}: unknown figure format. Fix: end it in .png or .svg")
  if importlib.util.find_spec("matplotlib") is None:
    raise PlotError("matplotlib is not installed. Fix: pip install 'loopjax[plot]'")
  plot(args.workdirs, output, args.dpi)
  print(f"wrote {output}")
  return 0


def plot(workdirs: list[str], output: str, dpi: int = 90):
  """Draws the runs in `workdirs` into `output`; returns the matplotlib Figure."""
  from loopjax.plotting import figure, runs
  fig = figure.draw(runs.load_all(workdirs))
  figure.save(fig, output, dpi)
  return fig
