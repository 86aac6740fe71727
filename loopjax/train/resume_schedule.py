"""A resumed run's LR schedule: changing it is explicit, never a silent jump.

The schedule is a function of the global step fitted to the run's length (`loopjax.phases`), so raising
`train.steps` (or changing optim.* or the phases) on a run with checkpoints moves its warmup and decay: a
finished WSD run would jump from its end LR back to its peak. Each checkpoint therefore records, in its
meta under "lr_schedule" (`record`): the LR its last step trained at, the LRs its schedule gives the next
two steps (the first a resume runs), the run's total steps, the settings that shape the schedule, and the
clamp it runs under (below).

On resume, `resume` compares the current config's schedule with those two LRs. They agree (nothing
changed, or e.g. a WSD run extended while still in its stable phase): training goes on as before. They
differ: `optim.on_schedule_change` says what happens:

  refuse      (default) a ConfigError at start-up, before anything compiles, naming the step, both LRs,
              the changed settings and the flag
  continue    the LR goes on from where the checkpoint left it, L (the LR of its last step), and never
              rises above it: lr(s) = min(new_schedule(s), L). A finished WSD or cosine run continues at
              its end LR, a WSD run extended mid-stable keeps its peak and decays towards the new end, a
              cosine stretched mid-way holds L until the new cosine falls below it
  reschedule  the new schedule as it is (the LR may jump; logged)

The clamp [step, L] goes into every later checkpoint, so a restart of a continued run follows the same
schedule (with or without the flag); a later change clamps again at the LR that run had reached.
Checkpoints written before this record existed: a plain run's schedule is rebuilt from the config the
checkpoint stores; a staged recipe's cannot be (its checkpoints store their phase's config), so it is
resumed unchecked, with a warning.
"""

import logging

import jax.numpy as jnp

from loopjax import config as config_lib
from loopjax.train.optim import learning_rate_schedule

log = logging.getLogger("loopjax")

SETTINGS = ("train.steps", "optim.schedule", "optim.lr", "optim.warmup_steps", "optim.decay_steps", "optim.end_lr")
RTOL = 1e-6  # LRs this close agree (float32 schedules evaluated by the same code agree exactly)


def settings(cfg) -> dict:
  """The settings that shape a run's LR schedule, flat: train.steps, optim.*, phases[i].<field>."""
  out = {key: cfg[key.split(".")[0]][key.split(".")[1]] for key in SETTINGS}

  def flat(prefix, d):
    for key, value in d.items():
      if isinstance(value, dict):
        flat(f"{prefix}{key}.", value)
      else:
        out[f"{prefix}{key}"] = value
  for i, p in enumerate(cfg.phases):
    flat(f"phases[{i}].", p.to_dict())
  return out


def clamped(schedule, lr: float):
  """`schedule`, never above `lr`."""
  return lambda count: jnp.minimum(schedule(count), lr)


def record(cfg, plan, clamp, step: int, last_lr=None) -> dict:
  """The "lr_schedule" entry of the checkpoint of `step`: `last_lr` is the LR its last step trained at (the
  step's logged `lr`, exactly what a continued run holds to; None: the schedule's, e.g. at step 0), `clamp`
  the [step, lr] the run runs under."""
  last_lr = plan.schedule(max(step - 1, 0)) if last_lr is None else last_lr
  return {"lr": [float(last_lr), float(plan.schedule(step)), float(plan.schedule(step + 1))], "clamp": clamp,
          "total_steps": plan.total_steps, "settings": settings(cfg)}


def _from_config(cfg, meta: dict, step: int) -> dict | None:
  """The record of a checkpoint written before records existed, from its stored config (plain runs)."""
  if cfg.phases:
    return None
  try:
    old = config_lib.config_from_dict(meta["config"])
  except (KeyError, TypeError, ValueError):
    return None
  schedule = learning_rate_schedule(old.optim, old.train.steps)
  return {"lr": [float(schedule(s)) for s in (max(step - 1, 0), step, step + 1)], "clamp": None,
          "total_steps": old.train.steps, "settings": settings(old)}


def _agree(a, b) -> bool:
  return all(abs(x - y) <= RTOL * max(abs(x), abs(y)) for x, y in zip(a, b))


def resume(cfg, plan, step: int, meta: dict):
  """(schedule, clamp) for a run resuming at `step` from a checkpoint with `meta`; ConfigError when the
  schedule changed and `cfg.optim.on_schedule_change` is "refuse". See the module docstring."""
  if step == 0:  # no step trained yet (e.g. `loopjax import-hf`'s start checkpoint): nothing to keep to
    return plan.schedule, None
  saved = meta.get("lr_schedule") or _from_config(cfg, meta, step)
  if saved is None:
    log.warning("the checkpoint at step %d records no LR schedule (written before loopjax recorded one, by a "
                "staged recipe): resuming with this config's schedule unchecked", step)
    return plan.schedule, None
  inherited = saved["clamp"]
  schedule = clamped(plan.schedule, inherited[1]) if inherited else plan.schedule
  old, new = saved["lr"][1:], [float(schedule(s)) for s in (step, step + 1)]
  before, now = saved["settings"], settings(cfg)
  changed = [f"{k} {before.get(k, '(unset)')} -> {now.get(k, '(unset)')}" for k in sorted(before.keys() | now.keys())
             if before.get(k) != now.get(k)]
  if step >= plan.total_steps or _agree(old, new):  # nothing left to train, or the same LRs from here on
    if changed and step < plan.total_steps:
      log.info("resumed at step %d with %s: the LR schedule continues as before (LR %.4g at step %d)", step,
               ", ".join(changed), new[0], step + 1)
    return schedule, inherited
  what = (", ".join(changed[:4]) + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else "") if changed else
          "no schedule setting changed; the plan's step lengths did (token-length phases on another device count)")
  last, choice = saved["lr"][0], cfg.optim.on_schedule_change
  if choice == "refuse":
    raise config_lib.ConfigError(
        f"config.optim.on_schedule_change: resuming at step {step} with {what} changes the LR schedule: step "
        f"{step + 1} would train at LR {new[0]:.3e} where the checkpoint's schedule gives {old[0]:.3e} (its step "
        f"{step} trained at {last:.3e}). Fix: set --config.optim.on_schedule_change=continue to go on from "
        f"{last:.3e} and never above it, =reschedule to follow the new schedule as it is, or undo the change.")
  if choice == "reschedule":
    log.warning("optim.on_schedule_change=reschedule: %s at step %d; the new schedule (ending at step %d) applies "
                "as it is: LR %.4g -> %.4g at step %d", what, step, plan.total_steps, old[0], new[0], step + 1)
    return plan.schedule, None
  log.warning("optim.on_schedule_change=continue: %s at step %d; the LR schedule that ended at step %d now ends "
              "at step %d, and from step %d on the LR is min(new schedule, %.4g), the LR step %d trained at", what,
              step, saved["total_steps"], plan.total_steps, step + 1, last, step)
  return clamped(plan.schedule, last), [step, last]
