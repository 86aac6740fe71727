"""The train keys that keep a long run observable and safe, with their defaults and start-up checks.

Trackers, the step watchdog, loss-spike skipping and profiles on demand: what a run left alone for weeks
needs (issue 31). They live here, beside `config.py`, which holds every other key; `default_config()`
adds these to its `train` section and `validate()` runs `check` with the other checks, so a bad value
still fails at start-up in one line naming the field and the fix.
"""

import importlib.util
import math

# train.trackers: where metrics go besides metrics.jsonl (always written). name -> (module, pip extra).
TRACKERS = {"tensorboard": ("tensorboardX", ""), "jsonl": ("json", ""), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}


def add_defaults(t):
  """Adds this module's keys to the config's `train` section `t`."""
  # Comma-separated, from TRACKERS; metrics.jsonl is always written. wandb honours WANDB_* (WANDB_MODE=offline,
  # WANDB_ENTITY, WANDB_API_KEY); mlflow logs to $MLFLOW_TRACKING_URI, else a file store in WORKDIR/mlruns.
  t.trackers = "tensorboard"
  t.tracker_project = "loopjax"  # the W&B project / MLflow experiment
  t.tracker_run_name = ""  # "" = the workdir's name
  # Watchdog (loopjax/train/watchdog.py): seconds without a finished step before the run dumps every thread's
  # stack and exits 76 (run again). 0 = auto (a generous multiple of the median step, at least 5 minutes);
  # inf = never. Restores, compiles, evaluations and saves get at least 30 minutes.
  t.step_timeout = 0.0
  # Loss-spike skipping (loopjax/train/spikes.py): a step whose loss or grad norm lies more than spike_factor
  # robust deviations above its median over the last spike_window applied steps is not applied (its batch is
  # consumed); spike_max_consecutive skips in a row stop the run (exit 3).
  t.skip_spikes = False
  t.spike_factor = 6.0
  t.spike_window = 128
  t.spike_max_consecutive = 10
  # A jax.profiler trace of steps START+1 .. END into WORKDIR/profile, e.g. "100:105" ("" = none). On demand:
  # `touch WORKDIR/PROFILE` (or write a step count into it) or `kill -USR1 PID` traces the next steps.
  t.profile_steps = ""


def profile_window(text: str) -> tuple[int, int] | None:
  """train.profile_steps "START:END" -> (START, END), None for "", ValueError when malformed."""
  if not str(text).strip():
    return None
  start, colon, end = str(text).partition(":")
  start, end = int(start), int(end) if colon else -1  # int() raises ValueError on anything but a whole number
  if not 1 <= start < end:
    raise ValueError(text)
  return start, end


def trackers(t) -> list[str]:
  """The tracker names train.trackers lists (jsonl first, always)."""
  names = [n.strip() for n in str(t.trackers).split(",") if n.strip()]
  return ["jsonl", *dict.fromkeys(n for n in names if n != "jsonl")]


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # a broken install, or one an import hook hides
    return False


def check(t, fail):
  """Start-up checks of the keys above; `fail(field, problem, fix)` raises the ConfigError."""
  for name in trackers(t):
    if name not in TRACKERS:
      fail("train.trackers", f"{name!r} is not a tracker", f"list some of {', '.join(TRACKERS)}, comma-separated")
    module, extra = TRACKERS[name]
    if extra and not _installed(module):
      fail("train.trackers", f"{name} needs the {module} package, which is not installed",
           f"pip install 'loopjax[{extra}]', or drop {name} from train.trackers")
  if not t.step_timeout >= 0:  # NaN fails too
    fail("train.step_timeout", f"must be >= 0 seconds, got {t.step_timeout}",
         "give seconds, 0 for the automatic limit, or inf to turn the watchdog off")
  if t.skip_spikes and not (0 < t.spike_factor < math.inf and t.spike_window >= 4 and t.spike_max_consecutive >= 1):
    fail("train.spike_factor", f"spike_factor={t.spike_factor}, spike_window={t.spike_window}, "
         f"spike_max_consecutive={t.spike_max_consecutive}",
         "use spike_factor > 0 (e.g. 6), spike_window >= 4 (e.g. 128) and spike_max_consecutive >= 1")
  try:
    profile_window(t.profile_steps)
  except ValueError:
    fail("train.profile_steps", f"{t.profile_steps!r} is not START:END with 1 <= START < END",
         "e.g. --config.train.profile_steps=100:105 traces steps 101-105 (after the compiling first step)")


def upgrade(values: dict) -> dict:
  """A config saved by an older loopjax, with its profile keys (profile_start + a step count) in today's form."""
  train = dict(values.get("train", {}))
  if "profile_start" in train:
    start, count = train.pop("profile_start"), train.pop("profile_steps", 0)
    train["profile_steps"] = f"{start}:{start + count}" if count else ""
  return dict(values, train=train)
