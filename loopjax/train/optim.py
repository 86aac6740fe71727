"""AdamW with global-norm clipping and a weight-decay mask, and the learning-rate schedules.

Schedules (all from optax, in optimizer steps):
  constant          lr
  warmup_constant   linear 0 -> lr over warmup_steps, then lr
  cosine            linear warmup, then cosine from lr to end_lr over the remaining (or decay_steps) steps
  wsd               warmup-stable-decay: linear warmup, constant lr, then linear decay to end_lr over
                    the last decay_steps steps (Ouro's overall LR shape)

Warmup and decay follow the run's length: when warmup_steps + decay_steps do not fit in the run
(`--config.train.steps=40` on a config written for 300), both shrink in proportion, and
`schedule_steps` says so in a note the driver prints. Shortening a run then just works.
Changing the length (or the schedule) of a run that has checkpoints is another matter: a resume whose
LR would change is refused unless `optim.on_schedule_change` says how (loopjax/train/resume_schedule.py).
"""

import jax
import jax.numpy as jnp
import optax

from loopjax.model import weight_decay_mask
from loopjax.train import spikes


def schedule_steps(optim_cfg, total_steps: int) -> tuple[int, int, str]:
  """(warmup, decay, note): the schedule's warmup and decay steps, shrunk to fit `total_steps`.

  `note` is "" when they fit as given, else a one-line explanation for the log.
  """
  o = optim_cfg
  warmup, decay = o.warmup_steps, o.decay_steps if o.schedule == "wsd" else 0
  needed = warmup + decay + (1 if o.schedule == "cosine" else 0)
  if o.schedule == "constant" or needed <= total_steps:
    return o.warmup_steps, o.decay_steps, ""
  scale = total_steps / needed
  warmup, decay = int(warmup * scale), int(decay * scale)
  note = (f"optim: warmup {o.warmup_steps}" + (f" + decay {o.decay_steps}" if o.schedule == "wsd" else "")
          + f" steps do not fit train.steps={total_steps}; scaled to warmup {warmup}"
          + (f" + decay {decay}" if o.schedule == "wsd" else ""))
  return warmup, (decay if o.schedule == "wsd" else o.decay_steps), note


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  o = optim_cfg
  warmup_steps, decay_steps, _ = schedule_steps(o, total_steps)
  warmup = optax.linear_schedule(0.0, o.lr, max(warmup_steps, 1))
  if o.schedule == "constant":
    return optax.constant_schedule(o.lr)
  if o.schedule == "warmup_constant":
    return optax.join_schedules([warmup, optax.constant_schedule(o.lr)], [warmup_steps])
  if o.schedule == "cosine":
    decay = decay_steps or max(total_steps - warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup_steps, warmup_steps + decay, o.end_lr)
  if o.schedule == "wsd":
    stable = total_steps - warmup_steps - decay_steps
    return optax.join_schedules(
        [warmup, optax.constant_schedule(o.lr), optax.linear_schedule(o.lr, o.end_lr, max(decay_steps, 1))],
        [warmup_steps, warmup_steps + stable])
  raise ValueError(f"unknown schedule {o.schedule!r}")


def make_optimizer(optim_cfg, schedule: optax.Schedule, decay_mask) -> optax.GradientTransformation:
  """AdamW with clipping; `decay_mask` is a tree of bools shaped like the params it will update."""
  o = optim_cfg
  return optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask),
  )


def run_optimizer(cfg, schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
  """The optimizer of a run: `cfg.optim` with the model's weight-decay mask (parameter metadata).

  `schedule`: a staged recipe's (see loopjax.phases); default: the one `cfg.optim` describes.
  """
  schedule = schedule or learning_rate_schedule(cfg.optim, cfg.train.steps)
  optimizer = make_optimizer(cfg.optim, schedule, weight_decay_mask(cfg.model))
  return spikes.guard(optimizer, cfg.train) if cfg.train.skip_spikes else optimizer


def fresh_state_at(optimizer: optax.GradientTransformation, params, step) -> optax.OptState:
  """`optimizer.init(params)` for a run at `step` (a phase that resets the optimizer, an upscale).

  The moments start afresh, and with them Adam's bias-correction count. The LR schedule's own count must
  not: optax reads the schedule at that count, so a plain `init` would send the LR back to its step 0
  (the warmup's start) in the middle of a run.
  """
  def at_step(s):
    if isinstance(s, optax.ScaleByScheduleState):
      return s._replace(count=jnp.asarray(step, s.count.dtype))
    return s
  return jax.tree.map(at_step, optimizer.init(params), is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
