"""Changing the LR schedule of a run with checkpoints is explicit, never a silent jump (issue #27 item 5).

Real training of the tiny model through `train()`, reading the logged `lr` from WORKDIR/metrics.jsonl; then
the schedule logic of `loopjax.train.resume_schedule` alone (cosine, staged recipes, old checkpoints).
"""

import json
import os
import shutil

import pytest

from helpers import tiny_config
from loopjax import config as config_lib
from loopjax import phases
from loopjax.train import resume_schedule
from loopjax.train import driver
from loopjax.train.driver import train
from loopjax.train.trainer import build_trainer
from loopjax.train.optim import learning_rate_schedule

LR, END_LR = 1e-3, 1e-4


def config(steps: int, **optim):
  """WSD, warmup 1 and decay 2: over 6 steps the LR counts 0..5 are 0, peak x3, peak, (peak + end) / 2."""
  cfg = tiny_config()
  cfg.train.steps, cfg.train.batch_size = steps, 8  # a row per fake CPU device
  cfg.optim.lr, cfg.optim.end_lr, cfg.optim.warmup_steps, cfg.optim.decay_steps = LR, END_LR, 1, 2
  cfg.checkpoint.every_steps, cfg.checkpoint.keep = 1, 20
  cfg.optim.update(optim)
  return cfg


def rows(workdir) -> dict:
  path = os.path.join(workdir, "metrics.jsonl")
  assert os.path.exists(path)
  with open(path) as f:
    out = {r["step"]: r for r in map(json.loads, f) if "loss" in r}
  assert all("lr" in r for r in out.values())
  return out


def lrs(workdir) -> dict:
  return {step: r["lr"] for step, r in rows(workdir).items()}


def checkpoints(workdir) -> list:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def copy(workdir, into, upto: int | None = None) -> str:
  """A copy of the run, its checkpoints after `upto` removed (as if it had stopped there)."""
  new = str(into / "run")
  shutil.copytree(workdir, new)
  for step in checkpoints(new):
    if upto is not None and step > upto:
      shutil.rmtree(os.path.join(new, "checkpoints", str(step)))
  return new


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 6-step WSD run with a checkpoint at every step."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  train(config(6), workdir)
  assert sorted(lrs(workdir)) == list(range(1, 7)) and checkpoints(workdir)[-1] == 6
  return workdir


@pytest.fixture(scope="module")
def continued(finished, tmp_path_factory):
  """The finished run extended to 10 steps with the flag."""
  workdir = copy(finished, tmp_path_factory.mktemp("continued"))
  train(config(10, on_schedule_change="continue"), workdir)
  return workdir


def test_more_steps_on_a_finished_run_are_refused_in_one_line_before_training(finished, tmp_path):
  workdir = copy(finished, tmp_path)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    metrics = f.read()
  with pytest.raises(config_lib.ConfigError) as e:
    train(config(10), workdir)
  message = str(e.value)
  assert "\n" not in message
  for part in ("config.optim.on_schedule_change: resuming at step 6 with train.steps 6 -> 10",
               "step 7 would train at LR 1.000e-03 where the checkpoint's schedule gives 1.000e-04",
               "its step 6 trained at 5.500e-04", "Fix: set --config.optim.on_schedule_change=continue"):
    assert part in message, message
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert f.read() == metrics  # nothing trained, nothing logged
  assert checkpoints(workdir) == checkpoints(finished)


def test_continue_goes_on_from_the_checkpoints_lr_and_never_above_it(finished, continued):
  first, second = lrs(finished), lrs(continued)
  assert sorted(second) == list(range(1, 11))
  assert [second[s] for s in range(1, 7)] == [first[s] for s in range(1, 7)]
  last = first[6]
  assert last == pytest.approx((LR + END_LR) / 2, rel=1e-6)
  assert second[7] == pytest.approx(last, rel=1e-9)
  assert all(second[s] <= last for s in range(7, 11))
  new = learning_rate_schedule(config(10).optim, 10)  # ends decaying to (peak + end) / 2 at step 10 too
  assert second[10] == pytest.approx(min(float(new(9)), last), rel=1e-6)
  with open(os.path.join(continued, "checkpoints", "10", "meta", "metadata")) as f:
    record = json.load(f)["lr_schedule"]
  assert record["clamp"] == [6, last] and record["total_steps"] == 10


def test_a_wsd_run_extended_in_its_stable_phase_needs_no_flag_and_keeps_its_peak(finished, tmp_path):
  workdir = copy(finished, tmp_path, upto=2)  # stopped at step 2, mid-stable: LR counts 2, 3 are the peak
  train(config(10), workdir)
  lr = lrs(workdir)
  new = learning_rate_schedule(config(10).optim, 10)
  assert sorted(lr) == list(range(1, 11))
  assert [lr[s] for s in range(3, 11)] == pytest.approx([float(new(s - 1)) for s in range(3, 11)], rel=1e-6)
  assert all(lr[s] == pytest.approx(LR, rel=1e-6) for s in range(2, 10))  # the peak until the new decay


def test_a_restart_of_the_continued_run_follows_the_same_schedule(continued, tmp_path, monkeypatch):
  built = []  # the schedules the trainers (their step and optimizer) are built with

  def build(cfg, mesh, schedule, *args):
    built.append(schedule)
    return build_trainer(cfg, mesh, schedule, *args)
  monkeypatch.setattr(driver, "build_trainer", build)
  workdir = copy(continued, tmp_path, upto=8)
  train(config(10), workdir)  # no flag needed: the clamp comes with the checkpoint
  last = lrs(continued)[6]
  assert [float(built[-1](s)) for s in (8, 9)] == pytest.approx([last, last], rel=1e-9)
  again, once = rows(workdir), rows(continued)
  assert sorted(again) == list(range(1, 11))
  assert [(again[s]["lr"], again[s]["loss"]) for s in again] == [(once[s]["lr"], once[s]["loss"]) for s in again]


# The schedule logic alone: a checkpoint's record from one config, resumed under another.

def resume(old_cfg, new_cfg, step: int, meta=None):
  """(LR counts step.. of the new plan, clamp) for new_cfg resuming old_cfg's checkpoint of `step`."""
  old = phases.plan(old_cfg, 8)
  meta = meta or {"lr_schedule": resume_schedule.record(old_cfg, old, None, step, float(old.schedule(step - 1)))}
  new = phases.plan(new_cfg, 8)
  schedule, clamp = resume_schedule.resume(new_cfg, new, step, meta)
  return [float(schedule(s)) for s in range(step, new.total_steps)], clamp, old.schedule


def cosine(steps: int, **optim):
  return config(steps, schedule="cosine", decay_steps=0, **optim)  # warmup 1, then cosine to the end


def test_a_cosine_stretched_midway_holds_its_lr_until_the_new_cosine_falls_below():
  old_cfg, new_cfg = cosine(20), cosine(40, on_schedule_change="continue")
  with pytest.raises(config_lib.ConfigError, match="train.steps 20 -> 40"):
    resume(old_cfg, cosine(40), 10)
  lr, clamp, old = resume(old_cfg, new_cfg, 10)
  last = float(old(9))
  new = learning_rate_schedule(new_cfg.optim, 40)
  assert clamp == [10, last] and lr[0] == last and max(lr) == last
  below = next(i for i, s in enumerate(range(10, 40)) if float(new(s)) < last)
  assert 0 < below < len(lr) - 1 and lr[:below] == [last] * below
  assert lr[below:] == pytest.approx([float(new(s)) for s in range(10 + below, 40)], rel=1e-6)
  # reschedule: the new schedule as it is
  lr, clamp, _ = resume(old_cfg, cosine(40, on_schedule_change="reschedule"), 10)
  assert clamp is None and lr == pytest.approx([float(new(s)) for s in range(10, 40)], rel=1e-6)


def recipe(steps: int, end_lr: float = END_LR, **optim):
  cfg = config(steps, **optim)
  cfg.phases = (phases.phase(name="a", steps=10, lr=LR, warmup_steps=2),
                phases.phase(name="b", steps=10, lr_shape="cosine", end_lr=end_lr))
  return cfg


def test_a_staged_recipe_scaled_by_train_steps_is_checked_and_continued():
  # Mid-way through phase a (constant): scaling the recipe from 10 to 20 steps changes no LR here.
  lr, clamp, _ = resume(recipe(10), recipe(20), 3)
  assert clamp is None and lr[:6] == pytest.approx([LR] * 6)
  # At the end: refused (train.steps named), or continued at the LR of the last step, never above it.
  with pytest.raises(config_lib.ConfigError, match=r"train.steps 10 -> 20 .*step 11 would train at LR 1.000e-03"):
    resume(recipe(10), recipe(20), 10)
  with pytest.raises(config_lib.ConfigError, match=r"phases\[1\].end_lr 0.0001 -> 5e-05"):
    resume(recipe(10), recipe(10, end_lr=5e-5), 8)
  lr, clamp, old = resume(recipe(10), recipe(20, on_schedule_change="continue"), 10)
  new = phases.plan(recipe(20), 8).schedule
  last = float(old(9))
  assert clamp == [10, last] and lr[0] == last and max(lr) == last
  assert lr[-1] == pytest.approx(float(new(19)), rel=1e-6) and lr[-1] < last


def test_a_restarted_continued_run_keeps_its_clamp_and_a_second_change_clamps_lower():
  _, clamp, _ = resume(cosine(20), cosine(40, on_schedule_change="continue"), 10)
  plan = phases.plan(cosine(40, on_schedule_change="continue"), 8)
  plan.schedule = resume_schedule.clamped(plan.schedule, clamp[1])  # what the continued run trains with

  def record(step):
    return {"lr_schedule": resume_schedule.record(cosine(40), plan, clamp, step, float(plan.schedule(step - 1)))}
  lr, again, _ = resume(cosine(40), cosine(40), 12, record(12))  # a restart, the flag dropped: no change
  assert again == clamp and lr == [float(plan.schedule(s)) for s in range(12, 40)]
  # Extended again at step 36, where the LR fell below the first clamp: clamped again there.
  with pytest.raises(config_lib.ConfigError, match="train.steps 40 -> 80"):
    resume(cosine(40), cosine(80), 36, record(36))
  lr, again, _ = resume(cosine(40), cosine(80, on_schedule_change="continue"), 36, record(36))
  last = float(plan.schedule(35))
  assert last < clamp[1] and again == [36, last] and lr[0] == last and max(lr) == last


def test_a_checkpoint_without_a_record_is_checked_against_its_stored_config():
  meta = {"config": json.loads(config(6).to_json())}  # written before checkpoints recorded their schedule
  with pytest.raises(config_lib.ConfigError, match="train.steps 6 -> 10"):
    resume(config(6), config(10), 6, meta)
  lr, clamp, old = resume(config(6), config(10, on_schedule_change="continue"), 6, meta)
  assert clamp == [6, float(old(5))] and max(lr) == float(old(5))


def test_an_unknown_choice_is_a_config_error():
  with pytest.raises(config_lib.ConfigError, match="optim.on_schedule_change"):
    config_lib.validate(config(6, on_schedule_change="jump"), 8)
