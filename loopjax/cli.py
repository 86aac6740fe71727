"""`loopjax <command> [flags]`: train, prepare, params.

Flags are absl flags; `--config` takes an ml_collections config file and `--config.a.b=value`
overrides any key (unknown keys are rejected). Parsing absl flags also lets grain's worker
processes start.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
COMMANDS = {}


def command(fn):
  COMMANDS[fn.__name__] = fn
  return fn


def _define_run_flags():
  config_flags.DEFINE_config_file("config", None, "ml_collections config file, e.g. configs/smoke.py",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "directory for metrics, TensorBoard events and checkpoints")
  flags.DEFINE_string("compile_cache", "~/.cache/loopjax/xla",
                      "persistent XLA compilation cache directory ('' disables it)")


def _enable_compile_cache(path: str):
  import os

  import jax
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _require(name: str):
  if FLAGS[name].value is None:
    raise app.UsageError(f"--{name} is required")


@command
def train(argv):
  """Train (or continue training) a model: loopjax train --config configs/smoke.py --workdir DIR."""
  del argv
  _require("config")
  _require("workdir")
  _enable_compile_cache(FLAGS.compile_cache)
  from loopjax.train.loop import train as run_training
  last = run_training(FLAGS.config, FLAGS.workdir)
  if last:
    logging.info("final step metrics: loss %.4f, tokens/s %.0f", last["loss"], last["tokens_per_sec"])


@command
def params(argv):
  """Print the parameter count of a config: loopjax params --config configs/ouro_1p4b.py."""
  del argv
  _require("config")
  from loopjax.train.state import count_params
  print(f"{count_params(FLAGS.config.model):,}")


def main():
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    names = "\n".join(f"  {name:10s} {fn.__doc__.splitlines()[0]}" for name, fn in COMMANDS.items())
    print(f"usage: loopjax <command> [--flags]\n\ncommands:\n{names}", file=sys.stderr)
    sys.exit(2)
  name = sys.argv[1]
  _define_run_flags()
  app.run(COMMANDS[name], argv=[f"loopjax {name}"] + sys.argv[2:])
