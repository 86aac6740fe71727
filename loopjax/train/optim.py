"""AdamW with global-norm clipping, a weight-decay mask, and the learning-rate schedules.

Schedules (all from optax, in optimizer steps):
  constant          lr
  warmup_constant   linear 0 -> lr over warmup_steps, then lr
  cosine            linear warmup, then cosine from lr to end_lr over the remaining (or decay_steps) steps
  wsd               warmup-stable-decay: linear warmup, constant lr, then linear decay to end_lr over
                    the last decay_steps steps (Ouro's overall LR shape)
"""

import jax
import optax

# Parameter names (last path component) that are never weight-decayed: biases; norm scales are
# recognised by "norm" in the name or an "ln" prefix (GPT-2 LayerNorms).
NO_DECAY_NAMES = frozenset({"bias", "bq", "bk", "bv", "bo", "b_fc", "b_proj"})


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  o = optim_cfg
  warmup = optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1))
  if o.schedule == "constant":
    return optax.constant_schedule(o.lr)
  if o.schedule == "warmup_constant":
    return optax.join_schedules([warmup, optax.constant_schedule(o.lr)], [o.warmup_steps])
  if o.schedule == "cosine":
    decay = o.decay_steps or max(total_steps - o.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, o.warmup_steps + decay, o.end_lr)
  if o.schedule == "wsd":
    stable = total_steps - o.warmup_steps - o.decay_steps
    return optax.join_schedules(
        [warmup, optax.constant_schedule(o.lr), optax.linear_schedule(o.lr, o.end_lr, max(o.decay_steps, 1))],
        [o.warmup_steps, o.warmup_steps + stable])
  raise ValueError(f"unknown schedule {o.schedule!r}")


def decay_mask(params) -> dict:
  """True for parameters that take weight decay: everything but norm scales and biases."""
  def decays(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return not ("norm" in name or name.startswith("ln") or name in NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg, total_steps: int, schedule: optax.Schedule | None = None
                   ) -> optax.GradientTransformation:
  """AdamW with clipping; `schedule` (a staged recipe's, see loopjax.phases) replaces optim.schedule."""
  o = optim_cfg
  return optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.adamw(schedule or learning_rate_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                  weight_decay=o.weight_decay, mask=decay_mask),
  )
