"""The errors a command reports as one line `loopjax <cmd>: <message>` instead of a traceback, and the
exit codes a scheduler (SLURM, a JobSet, a shell loop) can act on:

  0   finished
  1   a bug: an unexpected exception, with its traceback
  2   refused at start-up: bad config, flags or input; fix what the line names and run again
  3   a fault during the run (disk full, no checkpoint restores, the workdir's lease lost, NaN with
      nan_policy=stop, train.spike_max_consecutive loss spikes in a row): one line; nothing saved was
      lost; needs a person
  75  EX_TEMPFAIL, "run the same command again": preempted (SIGTERM/SIGINT) with its checkpoint saved, or
      storage that stayed unavailable through the retries.
  76  hung: no train step finished within train.step_timeout (a stuck collective, host or reader); every
      thread's stack is in the log and the run resumes from its newest checkpoint when run again.
The launch scripts run the command again on 75 and 76 only.

Each expected error is raised where the problem is found and already names the setting, file or flag
and the fix; a traceback would only bury that (`-v` shows it). Its class's `exit_code` picks 2, 3 or 75.
"""

import logging
import sys
import threading
import traceback

# module -> error class; looked up in sys.modules, so reporting imports nothing heavy (orbax, jax):
# an error can only come from a module that was imported.
EXPECTED = {
    "loopjax.config": "ConfigError",
    "loopjax.checkpoint": "CheckpointError",
    "loopjax.data.records": "CorpusError",
    "loopjax.data.readers": "InputError",
    "loopjax.data.tokenizer": "TokenizerError",
    "loopjax.data.prepare.options": "PrepareError",
    "loopjax.upscale": "UpscaleError",
    "loopjax.hf.errors": "HFError",
    "loopjax.preflight": "TopologyError",
    "loopjax.distributed": "DistributedError",
    "loopjax.infer.inputs": "GenerateError",
    "loopjax.evaluation.harness": "HarnessError",
    "loopjax.storage": "StorageError",
    "loopjax.plotting.runs": "PlotError",
    "loopjax.lease": "LeaseError",
    "loopjax.train.hooks": "NonFiniteLossError",
    "loopjax.train.writer": "MetricsWriteError",
    "loopjax.train.spikes": "SpikeError",
    "loopjax.train.trackers": "TrackerError",
}
EXIT_USAGE = 2
EXIT_FAULT = 3  # an error class's `exit_code` for a fault during the run (e.g. a lost workdir lease)
EXIT_RETRY = 75  # EX_TEMPFAIL: preempted with a checkpoint saved, or storage unavailable: run again
EXIT_HUNG = 76  # the step watchdog ended a run whose steps stopped finishing (loopjax/train/watchdog.py): run again


def is_expected(error: BaseException) -> bool:
  return any(isinstance(error, getattr(sys.modules[module], name))
             for module, name in EXPECTED.items() if module in sys.modules)


def reported(command: str, fn, *args, verbose: bool = False) -> int:
  """fn(*args)'s exit code; an expected error is printed as one line and gives its class's `exit_code`
  (EXIT_USAGE when it has none)."""
  try:
    return fn(*args)
  except Exception as error:  # noqa: BLE001 - re-raised unless it is one of EXPECTED
    if not is_expected(error):
      raise
    if verbose:
      traceback.print_exc()
    message = " ".join(str(error).split("\n"))
    print(f"loopjax {command}: {message}", file=sys.stderr, flush=True)
    if not verbose:
      _quiet_shutdown()
    return getattr(error, "exit_code", EXIT_USAGE)


def _quiet_shutdown():
  """After the one line, the process only shuts down: what libraries still say then is the same fault
  again (a writer's atexit flush onto the full disk, a background thread whose queue was closed, an
  async save's orphaned tasks), so it is dropped. `-v` keeps it."""
  sys.unraisablehook = lambda unraisable: None
  threading.excepthook = lambda args: None
  logging.disable(logging.CRITICAL)
