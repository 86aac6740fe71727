"""`loopjax plot` on a real two-phase run: the file is a figure, and the figure has its panels."""

import json
import os

import pytest

from helpers import tiny_config
from loopjax import phases
from loopjax.cli import run as cli_run
from loopjax.cli.plot import plot
from loopjax.train.driver import train

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """Two short runs on multi-hop QA (evaluated every 2 steps); the first has two phases."""
  runs = []
  for name, beta in (("beta0.1", 0.1), ("beta0", 0.0)):
    cfg = tiny_config(vocab_size=128, loop_steps=3)
    cfg.data.source = "multihop"
    cfg.train.batch_size, cfg.train.seq_len, cfg.train.steps = 8, 64, 4
    cfg.objective.beta = beta
    cfg.eval.every_steps, cfg.eval.num_batches, cfg.eval.loop_steps = 2, 1, "1,3"
    cfg.checkpoint.every_steps = 0
    if name == "beta0.1":
      cfg.train.steps = 0
      cfg.phases = (phases.phase(name="a", steps=2), phases.phase(name="b", steps=2, beta=0.05))
    workdir = str(tmp_path_factory.mktemp(name))
    train(cfg, workdir)
    runs.append(workdir)
  return runs


def _titles(fig) -> list[str]:
  return [ax.get_title() for ax in fig.axes]


def test_plot_writes_a_png_with_every_panel(workdirs, tmp_path):
  out = str(tmp_path / "runs.png")
  fig = plot(workdirs, out)
  with open(out, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  assert os.path.getsize(out) > 20_000
  titles = _titles(fig)
  assert titles[:3] == ["Training loss (objective, incl. -beta H)", "Training cross-entropy per loop step",
                        "Expected exit step"]
  assert [t for t in titles if t.startswith("Exit distribution")] == [
      f"Exit distribution p(t): {os.path.basename(w)}" for w in workdirs]
  assert "Held-out exact match per loop step (teacher-forced)" in titles
  assert [t.get_text() for t in fig.legends[0].get_texts()] == [os.path.basename(w) for w in workdirs]
  ce_lines = [line for line in fig.axes[1].get_lines() if line.get_gid() != "phase-boundary"]
  assert len(ce_lines) == 2 * 3  # one line per loop step per run


def test_phase_boundaries_are_marked(workdirs, tmp_path):
  fig = plot(workdirs[:1], str(tmp_path / "one.svg"))
  loss_axis = fig.axes[0]
  assert [t.get_text() for t in loss_axis.texts] == ["b"]
  assert open(tmp_path / "one.svg").read(200).lstrip().startswith("<?xml")


def test_accuracy_vs_depth_panel_when_generate_results_are_logged(workdirs, tmp_path):
  """A `loopjax eval --generate` row (its shape, values made up) adds the accuracy-vs-depth panel."""
  workdir = workdirs[1]
  row = {"step": 4, "gen/q": [0.1, 0.5, 0.9], "gen_T3/exact_match_q": [0.1, 0.2, 0.3],
         "gen_T3/mean_depth_q": [1.0, 1.5, 2.5], "gen_T3/exact_match_full_depth": 0.3}
  copy = tmp_path / "gen"
  copy.mkdir()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    (copy / "metrics.jsonl").write_text(f.read() + json.dumps(row) + "\n")
  fig = plot([str(copy)], str(tmp_path / "gen.png"))
  assert _titles(fig)[-1] == "Exact match vs average depth (Q-exit decoding)"
  assert list(fig.axes[-1].get_lines()[0].get_xdata()) == [1.0, 1.5, 2.5, 3]


def test_cli_errors_are_one_line(tmp_path, capsys):
  assert cli_run(["plot", str(tmp_path)]) == 2
  assert cli_run(["plot", str(tmp_path), "--output", "x.pdf"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and "no training rows" in err[0] and ".png or .svg" in err[1]
