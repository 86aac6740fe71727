"""The errors a command reports as one line `loopjax <cmd>: <message>` (exit 2) instead of a traceback.

Each is raised where the problem is found and already names the setting, file or flag and the fix;
a traceback would only bury that. Anything else is a bug and keeps its traceback.
"""

import sys

# module -> error class; looked up in sys.modules, so reporting imports nothing heavy (orbax, jax):
# an error can only come from a module that was imported.
EXPECTED = {
    "loopjax.config": "ConfigError",
    "loopjax.checkpoint": "CheckpointError",
    "loopjax.data.records": "CorpusError",
    "loopjax.data.readers": "InputError",
    "loopjax.data.tokenizer": "TokenizerError",
    "loopjax.upscale": "UpscaleError",
    "loopjax.hf.errors": "HFError",
    "loopjax.preflight": "TopologyError",
    "loopjax.distributed": "DistributedError",
    "loopjax.infer.inputs": "GenerateError",
    "loopjax.storage": "StorageError",
    "loopjax.plotting.runs": "PlotError",
}
EXIT_USAGE = 2


def is_expected(error: BaseException) -> bool:
  return any(isinstance(error, getattr(sys.modules[module], name))
             for module, name in EXPECTED.items() if module in sys.modules)


def reported(command: str, fn, *args) -> int:
  """fn(*args)'s exit code; an expected error is printed as one line and gives EXIT_USAGE."""
  try:
    return fn(*args)
  except Exception as error:  # noqa: BLE001 - re-raised unless it is one of EXPECTED
    if not is_expected(error):
      raise
    message = " ".join(str(error).split("\n"))
    print(f"loopjax {command}: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE
