"""The real training entry point: loss falls, metrics.jsonl and TensorBoard events are written."""

import glob
import json
import os

import pytest

from helpers import tiny_config
from loopjax.train.loop import train

METRIC_KEYS = {"step", "loss", "ce_per_step", "exit_probs", "entropy", "expected_exit_step", "tokens_per_sec",
               "mfu", "grad_norm", "lr"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  cfg = tiny_config()
  cfg.model.loop_steps = 4
  cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len, cfg.train.log_every = 30, 8, 64, 5
  cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.decay_steps = 3e-3, 5, 5
  cfg.data.loss_on = "all"
  workdir = str(tmp_path_factory.mktemp("train"))
  train(cfg, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return cfg, workdir, rows


def test_loss_falls_over_30_steps(run):
  _, _, rows = run
  assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]


def test_metrics_rows_hold_every_key_with_one_value_per_loop_step(run):
  cfg, _, rows = run
  for row in rows:
    assert METRIC_KEYS <= set(row)
    assert len(row["ce_per_step"]) == len(row["exit_probs"]) == cfg.model.loop_steps
    assert abs(sum(row["exit_probs"]) - 1) < 1e-5
    assert 1 <= row["expected_exit_step"] <= cfg.model.loop_steps
    assert row["tokens_per_sec"] > 0 and 0 < row["mfu"] < 1


def test_tensorboard_events_hold_the_scalars(run):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  _, workdir, rows = run
  files = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert files
  events = EventAccumulator(os.path.dirname(files[0]))
  events.Reload()
  losses = [(e.step, e.value) for e in events.Scalars("loss")]
  assert [s for s, _ in losses] == [r["step"] for r in rows]
  assert losses[-1][1] == pytest.approx(rows[-1]["loss"], rel=1e-6)
  assert "ce_per_step/4" in events.Tags()["scalars"]
