"""Log set-up of the CLI: loopjax's own INFO lines in a short form, everyone else's from WARNING up.

JAX, Orbax, grain and absl log at INFO freely (Orbax alone writes ~80 lines around one checkpoint
save), which buries the progress bar and loopjax's few lines. Warnings and errors always show; `-v`
turns everyone's INFO back on, the C++ logs of jaxlib included.
"""

import logging
import os
import sys

# jaxlib's C++ logging (absl) reads this once, when jax is imported: 0 = INFO, 1 = WARNING, 2 = ERROR.
NATIVE_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
VERBOSE_FLAGS = ("-v", "--verbose")
VERBOSE_HELP = "also show the INFO logs of JAX (its C++ runtime too), Orbax, grain and absl"


def verbose_requested(argv: list[str]) -> bool:
  """Whether argv asks for -v, looked up before argparse runs: building the parsers imports jax."""
  flags = argv[:argv.index("--")] if "--" in argv else argv
  return any(arg in VERBOSE_FLAGS for arg in flags)


def set_native_level(verbose: bool):
  """Sets the C++ log level for the jax import to come, unless the user chose one."""
  os.environ.setdefault(NATIVE_LEVEL_ENV, "0" if verbose else "1")


class _Formatter(logging.Formatter):
  """"loopjax: message" for loopjax's INFO; level and origin for warnings and everyone else's lines."""

  def format(self, record):
    message = record.getMessage()
    if record.exc_info:
      message += "\n" + self.formatException(record.exc_info)
    if record.name.split(".")[0] == "loopjax":
      level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
      return f"loopjax: {level}{message}"
    return f"{record.levelname[0]} {record.name} {record.filename}:{record.lineno}] {message}"


def _not_a_read_only_notice(record) -> bool:
  """Orbax warns on every checkpoint directory opened read-only, which loopjax does on purpose to
  read one (`loopjax checkpoints`, `eval`, resuming): a warning about nothing, dropped unless -v."""
  return not (record.filename == "checkpoint_manager.py" and "read only" in record.getMessage().replace("_", " "))


def _not_a_background_save_failure(record) -> bool:
  """A failing async save makes Orbax's background threads log the same storage error a dozen times,
  each with a traceback (and asyncio its orphaned tasks' errors); the checkpointer raises it once as
  one line naming the step (loopjax/checkpoint/manager.py). Dropped unless -v."""
  if record.levelno < logging.ERROR:
    return True
  from_orbax = record.name == "absl" and f"{os.sep}orbax{os.sep}" in record.pathname
  orphaned = record.name == "asyncio" and "exception was never retrieved" in record.getMessage()
  return not (from_orbax or orphaned)


def _without_closed_loop_callbacks(unraisable):
  """Tensorstore completes a failed async save's futures from its own threads after Orbax closed the
  event loop they belong to; each prints "Event loop is closed" with a traceback. Dropped unless -v."""
  closed_loop = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
  if not closed_loop:
    sys.__unraisablehook__(unraisable)


class _Handler(logging.StreamHandler):
  """The CLI's stderr handler: its own class, so a second set-up replaces it instead of adding one,
  and it writes to whatever sys.stderr is at the time (a redirect, or pytest's capture, may change it)."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, _):
    pass  # StreamHandler.__init__ sets it; the property always answers sys.stderr

  def emit(self, record):
    """While a progress bar is on screen, a line goes above it (tqdm.write) instead of through it."""
    bars = sys.modules.get("tqdm")
    if bars is None or not getattr(bars.tqdm, "_instances", None):
      return super().emit(record)
    try:
      bars.tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # noqa: BLE001 - logging's own contract: a handler reports, never raises
      self.handleError(record)


def configure(verbose: bool):
  """Routes every Python logger through one stderr handler: INFO for loopjax (and all with -v)."""
  handler = _Handler()
  handler.setFormatter(_Formatter())
  if not verbose:
    handler.addFilter(_not_a_read_only_notice)
    handler.addFilter(_not_a_background_save_failure)
    sys.unraisablehook = _without_closed_loop_callbacks
  root = logging.getLogger()
  for old in [h for h in root.handlers if isinstance(h, _Handler)]:
    root.removeHandler(old)
  root.addHandler(handler)
  root.setLevel(logging.INFO if verbose else logging.WARNING)
  logging.captureWarnings(True)  # Python warnings through the same handler: above the progress bar
  logging.getLogger("loopjax").setLevel(logging.INFO)
