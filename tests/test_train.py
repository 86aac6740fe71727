"""The real training entry point: loss falls, metrics.jsonl and TensorBoard events are written."""

import glob
import json
import os
import time

import jax
import pytest

from helpers import random_batch, tiny_config
from loopjax.model import flops_per_token
from loopjax.train.driver import global_batch, train
from loopjax.train.trainer import build_trainer, make_mesh

METRIC_KEYS = {"step", "loss", "ce_per_step", "exit_probs", "entropy", "expected_exit_step", "tokens_per_sec",
               "mfu", "grad_norm", "lr"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  cfg = tiny_config()
  cfg.model.loop_steps = 4
  cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len, cfg.train.log_every = 30, 8, 64, 5
  cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.decay_steps = 3e-3, 5, 5
  cfg.data.loss_on = "all"
  cfg.eval.every_steps, cfg.eval.loop_steps, cfg.eval.num_batches = 15, "2,4", 1
  cfg.train.peak_flops = 1e11  # the MFU denominator, given instead of measured
  workdir = str(tmp_path_factory.mktemp("train"))
  result = train(cfg, workdir)
  assert (result.step, result.preempted) == (30, False)
  assert result.checkpoint_dir == os.path.join(workdir, "checkpoints", "30")
  with open(result.metrics_path) as f:
    rows = [json.loads(line) for line in f]
  assert result.last_metrics["loss"] == rows[-2]["loss"]  # the last row is the step's evaluation
  return cfg, workdir, [r for r in rows if "loss" in r], [r for r in rows if "eval_T4/loss" in r]


def test_loss_falls_over_30_steps(run):
  _, _, rows, _ = run
  assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]


def test_metrics_rows_hold_every_key_with_one_value_per_loop_step(run):
  """Every row: per-step CE and exit mass, and MFU = tokens/s x FLOPs per token / train.peak_flops."""
  cfg, _, rows, _ = run
  for row in rows:
    assert METRIC_KEYS <= set(row)
    assert len(row["ce_per_step"]) == len(row["exit_probs"]) == cfg.model.loop_steps
    assert abs(sum(row["exit_probs"]) - 1) < 1e-5
    assert 1 <= row["expected_exit_step"] <= cfg.model.loop_steps
    assert row["tokens_per_sec"] > 0
    flops = flops_per_token(cfg.model, cfg.train.seq_len)
    assert row["mfu"] == pytest.approx(row["tokens_per_sec"] * flops / cfg.train.peak_flops, rel=1e-12)


def test_tensorboard_events_hold_the_scalars(run):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  _, workdir, rows, _ = run
  files = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert files
  events = EventAccumulator(os.path.dirname(files[0]))
  events.Reload()
  losses = [(e.step, e.value) for e in events.Scalars("loss")]
  assert [s for s, _ in losses] == [r["step"] for r in rows]
  assert losses[-1][1] == pytest.approx(rows[-1]["loss"], rel=1e-6)
  assert "ce_per_step/4" in events.Tags()["scalars"]


def test_periodic_evaluation_at_two_loop_counts(run):
  _, workdir, rows, eval_rows = run
  assert [r["step"] for r in eval_rows] == [15, 30]
  for r in eval_rows:
    assert len(r["eval_T2/ce_per_step"]) == 2 and len(r["eval_T4/exact_match_per_step"]) == 4
    assert 0 <= r["eval_T4/exact_match_q_exit"] <= 1
  # The held-out loss falls with training too.
  assert eval_rows[1]["eval_T4/loss"] < eval_rows[0]["eval_T4/loss"]


def test_evaluating_the_saved_checkpoint_reproduces_the_last_eval(run):
  """`loopjax eval`'s path: restore params from the final checkpoint with the run's saved config."""
  from loopjax.evaluation.teacher_forced import evaluate_checkpoint
  _, workdir, _, eval_rows = run
  step, results = evaluate_checkpoint(os.path.join(workdir, "checkpoints"))
  assert step == 30
  for key in ("eval_T2/loss", "eval_T4/loss", "eval_T4/exact_match_q_exit"):
    assert results[key] == pytest.approx(eval_rows[-1][key], rel=1e-5)


def test_eval_cli_reports_a_missing_checkpoint_in_one_line(tmp_path):
  import subprocess
  import sys
  result = subprocess.run([sys.executable, "-m", "loopjax.cli", "eval", "--checkpoint", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert "no complete checkpoint" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("objective", ["lm", "gate"])
def test_the_step_runs_at_the_loop_count_of_its_config(objective):
  """The step builds its model from the config it is given: a T=8 config trains at T=8."""
  cfg = tiny_config(loop_steps=8)
  trainer = build_trainer(cfg, make_mesh(cfg, jax.devices()[:1]), objective=objective)
  with jax.set_mesh(trainer.mesh):
    _, metrics = trainer.train_step(trainer.init_state(), global_batch(random_batch(cfg), trainer.mesh))
  assert metrics["ce_per_step"].shape == metrics["exit_probs"].shape == (8,)
  # MFU counts what the step computes: a gate step's backward pass never enters the loop.
  assert trainer.flops_per_token == flops_per_token(cfg.model, cfg.train.seq_len, training=objective == "lm")


def test_profile_hook_writes_a_trace_of_the_asked_steps(tmp_path):
  cfg = tiny_config()
  cfg.train.steps, cfg.train.batch_size, cfg.train.profile_steps = 4, 8, "1:3"
  train(cfg, str(tmp_path))
  traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_peak_flops_comes_from_config_env_or_a_probe(monkeypatch):
  from loopjax.metrics import PEAK_FLOPS_ENV, peak_flops
  cfg = tiny_config()
  monkeypatch.setenv(PEAK_FLOPS_ENV, "2.5e12")
  assert peak_flops(cfg) == (2.5e12, PEAK_FLOPS_ENV)
  cfg.train.peak_flops = 3e12
  assert peak_flops(cfg) == (3e12, "train.peak_flops")
  monkeypatch.delenv(PEAK_FLOPS_ENV)
  cfg.train.peak_flops = 0.0
  measured, source = peak_flops(cfg)  # CPU: the model's own [B x S, D] @ [D, F] matmul
  assert measured > 1e8 and "[64, 32] @ [32, 48] float32" in source


def test_profiles_on_demand_from_the_request_file_and_sigusr1(tmp_path, caplog):
  """WORKDIR/PROFILE (here left before the start, asking for 2 steps) and SIGUSR1 mid-run each trace."""
  import signal
  import threading
  cfg = tiny_config()
  cfg.train.steps, cfg.train.batch_size = 40, 8
  (tmp_path / "PROFILE").write_text("2\n")

  def signal_once_running():
    while not os.path.exists(tmp_path / "metrics.jsonl") or len(open(tmp_path / "metrics.jsonl").readlines()) < 8:
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGUSR1)
  threading.Thread(target=signal_once_running, daemon=True).start()
  with caplog.at_level("INFO", logger="loopjax"):
    train(cfg, str(tmp_path))
  assert "profiling steps 2-3" in caplog.text and caplog.text.count("profiling steps") == 2
  assert not (tmp_path / "PROFILE").exists()  # consumed
  traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert len(traces) == 2 and all(os.path.getsize(t) > 0 for t in traces)
