"""Staged recipes: `config.phases` parsed into a plan of steps, the LR schedule, and their validation.

A recipe is an ordered tuple of phases (Ouro's 1a, 1b, 2, 3, 4; SPEC section 3), each made with
`phase(...)`. A phase changes only what it names: a setting left unset keeps the previous phase's
value (the first phase: the base config's). Its length (`steps` or `tokens`), `warmup_steps`,
`lr_shape`, `optimizer_on_entry` and `upscale` describe that phase alone.

The plan is the list of `Phase`s, each made of `Segment`s: runs of steps whose compiled shapes are
fixed, each with its derived single-phase config. A phase is one segment, or several when its batch
ramps up (the ramp goes up in `batch_ramp_stages` equal increments,
so each batch size compiles once). Steps are counted globally across phases, so the LR schedule is one
function of the step (`schedule`) and the optimizer never changes between phases.

`plan(cfg, num_devices)` validates everything before anything is built: each segment's derived config
goes through `config.validate` (batch divisibility, sequence length vs. positions and loss chunks,
mixture weights, ...) and errors name the phase: `config.phases[i] ('name'): <problem>. Fix: <fix>.`

A config without phases is a one-phase, one-segment plan with the schedule `cfg.optim` describes, so
the driver has one path. `train.steps` on a recipe: 0 runs it at its own length; N > 0 scales every
phase (and its warmup and batch ramp) in proportion so the recipe runs in N steps, every phase kept
(at least one step each): the way to smoke-test a recipe, `--config.train.steps=40`.
"""

import dataclasses
import math

import ml_collections
import optax

from loopjax import config as config_lib
from loopjax import upscale
from loopjax.model import model_kind
from loopjax.train.optim import learning_rate_schedule, schedule_steps

LR_SHAPES = ("constant", "cosine", "linear")
OBJECTIVES = ("lm", "gate")
ON_ENTRY = ("keep", "reset")
# Fields that keep the previous phase's value when unset: where the base config has them, and "unset".
INHERITED = {"batch_tokens": (None, 0), "seq_len": (("train", "seq_len"), 0),
             "loop_steps": (("model", "loop_steps"), 0), "beta": (("objective", "beta"), -1.0),
             "rope_base": (("model", "rope_base"), 0.0), "data_weights": (("data", "weights"), ""),
             "per_device_batch": (("train", "per_device_batch"), -1)}
MESH_AXES = ("data", "fsdp", "context", "tensor")  # a phase's `mesh.<axis>`: 0 keeps the previous phase's size


def phase(**fields) -> ml_collections.ConfigDict:
  """One phase with every key (unknown keys are an error); pass the ones this phase sets."""
  p = ml_collections.ConfigDict()
  p.name = ""
  p.steps = 0  # length in optimizer steps, or
  p.tokens = 0  # length in tokens (the last step may overshoot by less than one batch)
  p.lr = 0.0  # peak / starting LR; 0 = where the previous phase ended
  p.lr_shape = "constant"  # constant at lr, or "cosine"/"linear" from lr to end_lr over the phase
  p.end_lr = 0.0
  p.warmup_steps = 0  # linear 0 -> lr over the first steps of this phase
  p.batch_tokens = 0  # global batch in tokens; 0 = previous (first phase: train.batch_size * seq_len)
  p.batch_ramp_from = 0  # > 0: start at this many tokens per batch and ramp linearly to batch_tokens
  p.batch_ramp_steps = 0  # over this many steps
  p.batch_ramp_stages = 4  # in this many increments
  p.seq_len = 0
  p.loop_steps = 0
  p.beta = -1.0
  p.rope_base = 0.0
  p.data_weights = ""  # comma-separated, one per data.source entry
  p.per_device_batch = -1  # rows per data-parallel shard at once (gradient accumulation; 0 = all); -1 = previous
  # The phase's mesh (each axis 0 = the previous phase's; -1 = the devices the others leave). A change
  # reshards the state on entry: e.g. context parallelism for a long-context phase only.
  p.mesh = ml_collections.ConfigDict({axis: 0 for axis in MESH_AXES})
  p.objective = "lm"  # "lm" (Stage I) or "gate" (Stage II: the LM frozen, only the exit gate trained)
  p.optimizer_on_entry = "keep"  # or "reset": a fresh optimizer state when the phase starts
  p.upscale = ml_collections.ConfigDict({"layers": 0, "mapping": "interleave", "moments": "duplicate"})
  p.lock()
  p.update(fields)
  return p


@dataclasses.dataclass(frozen=True)
class Segment:
  phase_index: int
  start: int  # global step before the segment's first step
  end: int  # global step after its last step
  cfg: ml_collections.ConfigDict  # the derived single-phase config (phases=()) its steps run with
  unit_rows: int  # the phase's data iterator yields batches of this many rows; a step takes several


@dataclasses.dataclass(frozen=True)
class Phase:
  index: int
  spec: ml_collections.ConfigDict
  start: int
  end: int
  tokens: int
  segments: tuple
  layers_before: int  # the stack's layer count on entry (before any upscale)
  lr_start: float  # after warmup
  lr_end: float


class Plan(list):
  """The phases in order, with `total_steps`, `phase_at(step)`, the LR `schedule` of the whole run
  and `notes` (adjustments the driver prints: a recipe scaled to train.steps, a shortened warmup)."""

  schedule: optax.Schedule
  notes: tuple[str, ...] = ()

  @property
  def total_steps(self) -> int:
    return self[-1].end

  def phase_at(self, step: int) -> Phase:
    """The phase whose steps produced the state at `step` (step 0: the first phase)."""
    return next(p for p in self if p.start < step <= p.end) if step else self[0]


def _fail(i: int, name: str, field: str, problem: str, fix: str):
  raise config_lib.ConfigError(f"config.phases[{i}] ({name!r}).{field}: {problem}. Fix: {fix}.")


def _segment(cfg, i: int, name: str, start: int, end: int, rows: int, values: dict, layers: int,
             unit: int, num_devices: int) -> Segment:
  """The segment with its derived config, validated like any single-phase config."""
  d = cfg.copy_and_resolve_references()
  d.phases = ()
  for key, (where, _) in INHERITED.items():
    if where is not None:
      d[where[0]][where[1]] = values[key]
  d.mesh.update(values["mesh"])
  d.model.num_layers, d.train.batch_size, d.checkpoint.phase = layers, rows, name
  d.train.steps = end  # until `plan` knows the recipe's length
  d.optim.schedule = "constant"  # the recipe's schedule (`schedule`) replaces optim.schedule
  try:
    config_lib.validate(d, num_devices)
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"config.phases[{i}] ({name!r}): in this phase {e}") from None
  return Segment(i, start, end, d, unit)


def _ramp(p, seq_len: int, dp: int, batch_tokens: int) -> list[tuple[int, int]]:
  """[(steps, rows)] of the ramp stages (rows rounded down to whole data-parallel groups)."""
  if not p.batch_ramp_from:
    return []
  stages, steps, quantum = p.batch_ramp_stages, p.batch_ramp_steps, seq_len * dp
  bounds = [round(k * steps / stages) for k in range(stages + 1)]
  sizes = [p.batch_ramp_from + (batch_tokens - p.batch_ramp_from) * k / stages for k in range(stages)]
  return [(b - a, max(1, int(s // quantum)) * dp) for a, b, s in zip(bounds, bounds[1:], sizes)]


def _check_phase(i, p, values, lr, kind: str):
  name = p.name
  if (p.steps > 0) == (p.tokens > 0):
    _fail(i, name, "steps", f"give exactly one of steps ({p.steps}) and tokens ({p.tokens})",
          "set steps or tokens to a positive length and the other to 0")
  for field, value, choices in (("lr_shape", p.lr_shape, LR_SHAPES), ("objective", p.objective, OBJECTIVES),
                                ("optimizer_on_entry", p.optimizer_on_entry, ON_ENTRY),
                                ("upscale.moments", p.upscale.moments, upscale.MOMENTS)):
    if value not in choices:
      _fail(i, name, field, f"{value!r} is not one of {choices}", f"use one of {choices}")
  if lr <= 0 or p.end_lr < 0 or p.warmup_steps < 0 or (p.lr_shape != "constant" and p.end_lr > lr):
    _fail(i, name, "lr", f"lr={lr}, end_lr={p.end_lr}, warmup_steps={p.warmup_steps}, shape {p.lr_shape}",
          "use lr > 0, 0 <= end_lr <= lr for a decay, and warmup_steps >= 0")
  if values["batch_tokens"] % values["seq_len"]:
    _fail(i, name, "batch_tokens", f"{values['batch_tokens']} tokens are not whole sequences of "
          f"seq_len={values['seq_len']}", f"use a multiple of {values['seq_len']}")
  if p.batch_ramp_from and not (0 < p.batch_ramp_from < values["batch_tokens"] and p.batch_ramp_stages >= 1
                                and p.batch_ramp_steps >= p.batch_ramp_stages):
    _fail(i, name, "batch_ramp_from", f"a ramp from {p.batch_ramp_from} to {values['batch_tokens']} tokens "
          f"over {p.batch_ramp_steps} steps in {p.batch_ramp_stages} stages cannot work",
          "ramp up from fewer tokens than batch_tokens, with batch_ramp_steps >= batch_ramp_stages >= 1")
  if p.objective == "gate" and not model_kind(kind).exit_gate:
    _fail(i, name, "objective", f"a {kind} model has no exit gate to train", "drop the gate phase for this model kind")
  if p.objective == "gate" and (p.upscale.layers or values["loop_steps"] < 2):
    _fail(i, name, "objective", "a gate phase trains the exit gate of the model as it is, over >= 2 steps",
          "upscale in an 'lm' phase before it, and keep loop_steps >= 2 (Stage II compares steps)")


def _lengths(i, p, values, dp) -> list[tuple[int, int]]:
  """[(steps, rows)] of the phase: the ramp stages, then the full batch."""
  stages = _ramp(p, values["seq_len"], dp, values["batch_tokens"])
  ramp_tokens = sum(n * r * values["seq_len"] for n, r in stages)
  if p.tokens:
    if p.tokens < ramp_tokens:
      _fail(i, p.name, "tokens", f"{p.tokens} tokens end inside the batch ramp ({ramp_tokens} tokens)",
            "lengthen the phase or shorten the ramp")
    rest = -(-(p.tokens - ramp_tokens) // values["batch_tokens"])
  else:
    rest = p.steps - sum(n for n, _ in stages)
    if rest < 0:
      _fail(i, p.name, "steps", f"{p.steps} steps end inside the {p.batch_ramp_steps}-step batch ramp",
            "lengthen the phase or shorten the ramp")
  stages = [(n, r) for n, r in stages + [(rest, values["batch_tokens"] // values["seq_len"])] if n]
  if p.warmup_steps > sum(n for n, _ in stages):
    _fail(i, p.name, "warmup_steps", f"{p.warmup_steps} warmup steps exceed the phase", "shorten the warmup")
  return stages


def plan(cfg, num_devices: int) -> Plan:
  """Validates the config (and every phase of a recipe) and returns its Plan; ConfigError names the field."""
  config_lib.validate(cfg, num_devices)
  if not cfg.phases:
    return _single_phase(cfg, num_devices)
  phases = _plan_phases(cfg, cfg.phases, num_devices)
  notes = ()
  if cfg.train.steps and cfg.train.steps != phases.total_steps:
    natural = phases.total_steps
    phases = _plan_phases(cfg, _scaled_specs(phases, cfg.train.steps), num_devices)
    notes = (f"recipe scaled from its {natural:,} steps to train.steps={cfg.train.steps} "
             f"({', '.join(f'{ph.spec.name}: {ph.end - ph.start}' for ph in phases)}); "
             "set --config.train.steps=0 for its own length",)
  phases.schedule, phases.notes = schedule(phases), notes
  return phases


def _single_phase(cfg, num_devices: int) -> Plan:
  """A config without phases: one phase, one segment, the schedule of `cfg.optim`."""
  t = cfg.train
  spec = phase(name=cfg.checkpoint.phase, steps=t.steps)
  seg = _segment(cfg, 0, spec.name, 0, t.steps, t.batch_size, _base_values(cfg), cfg.model.num_layers,
                 t.batch_size, num_devices)
  end_lr = cfg.optim.lr if cfg.optim.schedule in ("constant", "warmup_constant") else cfg.optim.end_lr
  phases = Plan([Phase(0, spec, 0, t.steps, t.steps * t.batch_size * t.seq_len, (seg,), cfg.model.num_layers,
                       cfg.optim.lr, end_lr)])
  seg.cfg.optim.schedule = cfg.optim.schedule  # `_segment` set the recipe's "constant"; this run has its own
  phases.schedule = learning_rate_schedule(cfg.optim, t.steps)
  phases.notes = tuple(note for note in [schedule_steps(cfg.optim, t.steps)[2]] if note)
  return phases


def _base_values(cfg) -> dict:
  values = {key: (cfg[w[0]][w[1]] if w else cfg.train.batch_size * cfg.train.seq_len)
            for key, (w, _) in INHERITED.items()}
  return dict(values, mesh={axis: cfg.mesh[axis] for axis in MESH_AXES})


def _phase_values(values: dict, p) -> dict:
  """The settings phase `p` runs with: its own where set, else those of the phase before (`values`)."""
  new = dict(values, **{key: p[key] for key, (_, unset) in INHERITED.items() if p[key] != unset})
  new["mesh"] = {axis: p.mesh[axis] or values["mesh"][axis] for axis in MESH_AXES}
  return new


def _plan_phases(cfg, specs, num_devices: int) -> Plan:
  names = [p.name for p in specs]
  values = _base_values(cfg)
  layers, step, lr, phases = cfg.model.num_layers, 0, cfg.optim.lr, Plan()
  for i, p in enumerate(specs):
    if not p.name or "/" in p.name or names.count(p.name) > 1:
      _fail(i, p.name, "name", f"{p.name!r} is empty, has a '/' or is used twice", "give each phase a unique name")
    values = _phase_values(values, p)
    try:
      data, fsdp, _, _ = config_lib.resolve_mesh_shape(ml_collections.ConfigDict(values["mesh"]), num_devices)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"config.phases[{i}] ({p.name!r}): in this phase {e}") from None
    lr = p.lr or lr
    _check_phase(i, p, values, lr, cfg.model.kind)
    layers_before = layers
    if p.upscale.layers and i == 0:
      _fail(i, p.name, "upscale", "the first phase starts from a fresh model, there is nothing to upscale",
            "set model.num_layers to the size you want, or upscale on entry to a later phase")
    if p.upscale.layers:
      try:
        upscale.layer_index(layers, p.upscale.layers, p.upscale.mapping)
      except upscale.UpscaleError as e:
        problem, fix = str(e).split(". Fix: ")
        _fail(i, p.name, "upscale", f"from {layers} layers: {problem}", fix.rstrip("."))
      layers = p.upscale.layers
    stages = _lengths(i, p, values, data * fsdp)
    unit = math.gcd(*[r for _, r in stages])
    segments, start = [], step
    for n, rows in stages:
      segments.append(_segment(cfg, i, p.name, step, step + n, rows, values, layers, unit, num_devices))
      step += n
    tokens = sum((s.end - s.start) * s.cfg.train.batch_size for s in segments) * values["seq_len"]
    end_lr = lr if p.lr_shape == "constant" else p.end_lr
    phases.append(Phase(i, p, start, step, tokens, tuple(segments), layers_before, lr, end_lr))
    lr = end_lr
  for s in (s for ph in phases for s in ph.segments):
    s.cfg.train.steps = step  # every derived config knows the recipe's length
  return phases


def _scaled_specs(phases: Plan, total: int) -> tuple:
  """The phase specs with lengths (and warmups, batch ramps) scaled so the recipe takes `total` steps."""
  if total < len(phases):
    raise config_lib.ConfigError(
        f"config.train.steps: {total} steps cannot hold the recipe's {len(phases)} phases. Fix: use at least "
        f"{len(phases)} steps, or 0 for the recipe's own length ({phases.total_steps:,} steps).")
  lengths = [ph.end - ph.start for ph in phases]
  shares = [n * total / phases.total_steps for n in lengths]
  steps = [max(1, int(x)) for x in shares]
  by_remainder = sorted(range(len(steps)), key=lambda i: int(shares[i]) - shares[i])
  while sum(steps) != total:  # hand out (or take back) single steps, largest remainder first
    grow = sum(steps) < total
    i = next(i for i in (by_remainder if grow else reversed(by_remainder)) if grow or steps[i] > 1)
    steps[i] += 1 if grow else -1
  specs = []
  for ph, n, new in zip(phases, lengths, steps):
    p = ph.spec.copy_and_resolve_references()
    p.steps, p.tokens = new, 0
    p.warmup_steps = min(new, max(1, p.warmup_steps * new // n)) if p.warmup_steps else 0
    ramp = p.batch_ramp_steps * new // n if p.batch_ramp_from else 0
    p.batch_ramp_from = p.batch_ramp_from if ramp else 0
    p.batch_ramp_steps, p.batch_ramp_stages = ramp, min(p.batch_ramp_stages, ramp) or p.batch_ramp_stages
    specs.append(p)
  return tuple(specs)


def schedule(phases: Plan) -> optax.Schedule:
  """The recipe's LR as a function of the global step: each phase's warmup, then its shape."""
  pieces, boundaries = [], []
  for ph in phases:
    warmup, decay = ph.spec.warmup_steps, max(ph.end - ph.start - ph.spec.warmup_steps, 1)
    if warmup:
      pieces.append(optax.linear_schedule(0.0, ph.lr_start, warmup))
      boundaries.append(ph.start + warmup)
    if ph.spec.lr_shape == "cosine":
      pieces.append(optax.cosine_decay_schedule(ph.lr_start, decay, alpha=ph.lr_end / ph.lr_start))
    elif ph.spec.lr_shape == "linear":
      pieces.append(optax.linear_schedule(ph.lr_start, ph.lr_end, decay))
    else:
      pieces.append(optax.constant_schedule(ph.lr_start))
    boundaries.append(ph.end)
  return optax.join_schedules(pieces, boundaries[:-1])
