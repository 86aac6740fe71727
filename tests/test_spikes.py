"""Loss-spike skipping (`train.skip_spikes`, loopjax/train/spikes.py): the guard's rule on hand-made values,
and a real run with injected spikes whose resume is bitwise the uninterrupted run."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import tiny_config
from loopjax.checkpoint import restore_params
from loopjax.config import ConfigError, default_config, validate
from loopjax.train import spikes
from loopjax.train.driver import Runner


def guarded(window=4, factor=6.0, max_consecutive=2):
  t = default_config().train
  t.skip_spikes, t.spike_window, t.spike_factor, t.spike_max_consecutive = True, window, factor, max_consecutive
  return spikes.guard(optax.adam(0.1), t)


def step(opt, state, params, grad: float, loss: float):
  updates, state = opt.update({"w": jnp.full(3, grad, jnp.float32)}, state, params, value=jnp.float32(loss))
  return optax.apply_updates(params, updates), state


def test_a_spike_is_dropped_whole_counted_and_a_streak_trips():
  opt, params = guarded(), {"w": jnp.ones(3, jnp.float32)}
  state = opt.init(params)
  for i in range(4):  # fills the window: nothing is judged before
    params, state = step(opt, state, params, 1.0 + 0.01 * i, 2.0 - 0.01 * i)
  assert int(state.applied) == 4 and int(state.skipped) == 0
  before_params, before_inner = params, state.inner
  params, state = step(opt, state, params, 1.02, 9.0)  # the loss far above its median
  assert (int(state.last), int(state.skipped), int(state.streak), int(state.applied)) == (1, 1, 1, 4)
  np.testing.assert_array_equal(params["w"], before_params["w"])
  jax.tree.map(np.testing.assert_array_equal, state.inner, before_inner)  # Adam's moments and count too
  params, state = step(opt, state, params, 1.01, 1.97)  # an ordinary step is applied again
  assert (int(state.last), int(state.streak), int(state.applied)) == (0, 0, 5)
  assert not np.array_equal(params["w"], before_params["w"])
  for _ in range(2):  # a gradient-norm spike, twice in a row: spike_max_consecutive=2 trips
    params, state = step(opt, state, params, 50.0, 1.96)
  assert (int(state.skipped), int(state.streak), int(state.tripped)) == (3, 2, 1)
  cfg = tiny_config()
  cfg.train.spike_max_consecutive = 2
  with pytest.raises(spikes.SpikeError, match="2 steps in a row were loss spikes .by step 8; none was applied, "
                     "3 skipped in all.*Fix: "):
    spikes.check(cfg, {"spike_tripped": state.tripped, "spike_steps": state.skipped}, 8)


def test_a_nonfinite_step_is_left_to_the_nan_guard_and_not_recorded():
  opt, params = guarded(), {"w": jnp.ones(3, jnp.float32)}
  state = opt.init(params)
  _, state = step(opt, state, params, 1.0, float("nan"))
  assert (int(state.applied), int(state.skipped), int(state.last)) == (0, 0, 0)


def test_checkpoint_metadata_round_trips_the_guard_exactly():
  opt, params = guarded(), {"w": jnp.ones(3, jnp.float32)}
  state = opt.init(params)
  for i in range(6):
    params, state = step(opt, state, params, 1.0 / 3 + i, 2.0 / 3 + i)
  meta = json.loads(json.dumps(spikes.to_meta(state)))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  rejoined = spikes.rejoin(abstract, spikes.strip(state), meta)
  jax.tree.map(np.testing.assert_array_equal, rejoined, state)
  fresh = spikes.rejoin(abstract, spikes.strip(state), None)  # a checkpoint saved with skipping off
  assert int(fresh.applied) == 0 and fresh.inner is state.inner


@pytest.mark.parametrize("field,value", [("spike_factor", 0.0), ("spike_window", 2), ("spike_max_consecutive", 0)])
def test_bad_spike_settings_fail_at_start_up(field, value):
  cfg = tiny_config()
  cfg.train.skip_spikes = True
  cfg.train[field] = value
  with pytest.raises(ConfigError, match=r"^config\.train\.spike_factor: .*Fix: use spike_factor > 0"):
    validate(cfg, 1)


SPIKES = (11, 17)  # the steps whose batch is corrupted


class SpikyRunner(Runner):
  """The real driver, its data stream corrupted at SPIKES: every target the last token id, which the task never
  uses, so the model has learnt to give it no probability (a loss spike)."""

  def run_segment(self, trainer, rows, hooks, preemption, state, tally, start, end):
    return super().run_segment(trainer, _Spiky(rows, start, self.cfg.model.vocab_size), hooks, preemption,
                               state, tally, start, end)


class _Spiky:
  def __init__(self, rows, step, vocab):
    self.rows, self.step, self.vocab = rows, step, vocab
    self.get_state, self.set_state = rows.get_state, rows.set_state

  def __iter__(self):
    return self

  def __next__(self):
    batch, self.step = next(self.rows), self.step + 1
    if self.step in SPIKES:
      batch = dict(batch, targets=np.full_like(batch["targets"], self.vocab - 1))
    return batch


TIMES = {"tokens_per_sec", "step_time", "mfu", "compile_seconds", "attention"}  # "attention": a segment's first row


def _rows(workdir):
  """The logged values that training computes (not the wall-clock ones, nor the first-row note)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k not in TIMES and not k.startswith("time_")} for r in rows]


@pytest.mark.slow
def test_injected_spikes_are_skipped_and_a_resume_between_them_is_bitwise(tmp_path):
  cfg = tiny_config()
  cfg.model.vocab_size = 128
  cfg.data.source = "multihop"
  cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = 24, 8, 64
  cfg.train.skip_spikes, cfg.train.spike_window, cfg.train.spike_factor = True, 6, 6.0
  cfg.optim.lr = 3e-3
  cfg.checkpoint.every_steps, cfg.checkpoint.keep = 6, 10
  whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
  SpikyRunner(cfg, whole).run()
  rows = _rows(whole)
  skipped = [r["step"] for r in rows if r["spike_skipped"]]
  assert skipped == list(SPIKES), [(r["step"], r["loss"], r["grad_norm"]) for r in rows]
  assert rows[-1]["spike_steps"] == len(SPIKES)
  shutil.copytree(whole, resumed)
  for later in ("18", "24"):  # as if killed after the save of step 12: the first spike before it, one after
    shutil.rmtree(os.path.join(resumed, "checkpoints", later))
  SpikyRunner(cfg, resumed).run()
  assert _rows(resumed) == rows  # every logged value of every step, spike counts included, bitwise
  final = [restore_params(os.path.join(d, "checkpoints"), step=24).items["params"] for d in (whole, resumed)]
  jax.tree.map(np.testing.assert_array_equal, *final)
