"""`loopjax <command> [flags]`: train, prepare, params, checkpoints, upscale.

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
  flags.DEFINE_string("topology", None, "TPU topology for `loopjax compile`, e.g. v5p:4x4x4 or v5p-128")
  flags.DEFINE_string("checkpoint", None, "`loopjax eval`: a workdir or its checkpoints directory")
  flags.DEFINE_integer("step", None, "`loopjax eval`: the checkpoint step (default: the newest)")
  flags.DEFINE_string("data", "", "`loopjax eval`: held-out data (a task or corpus dirs); default: the run's")
  flags.DEFINE_string("loop_steps", "", "`loopjax eval`: loop counts to evaluate at, e.g. 1,2,4,8")
  flags.DEFINE_string("output", "", "`loopjax eval`: also append the results as a JSON line to this file")
  from loopjax import distributed
  distributed.define_flags()  # --coordinator, --num_processes, --process_id, --local_devices, ...


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
  from loopjax import distributed
  distributed.initialize(distributed.settings_from(FLAGS))  # before anything touches the backend
  _enable_compile_cache(FLAGS.compile_cache)
  from loopjax.train.loop import train as run_training
  last = run_training(FLAGS.config, FLAGS.workdir)
  import jax
  if last and jax.process_index() == 0:
    logging.info("final step metrics: loss %.4f, tokens/s %.0f", last["loss"], last["tokens_per_sec"])


@command
def checkpoints(argv):
  """List the checkpoints of a run: loopjax checkpoints WORKDIR (step, phase, size, complete)."""
  if len(argv) != 2:
    raise app.UsageError("usage: loopjax checkpoints WORKDIR")
  import os

  from loopjax.checkpoint import list_checkpoints
  directory = os.path.join(argv[1], "checkpoints")
  rows = list_checkpoints(directory)
  if not rows:
    print(f"no checkpoints in {directory}")
    return
  print(f"{'step':>8}  {'phase':10}  {'size':>10}  {'complete':8}  note")
  for r in rows:
    print(f"{r['step']:>8}  {r['phase']:10}  {r['bytes'] / 2**20:>8.2f}MB  {'yes' if r['complete'] else 'NO':8}  "
          f"{r['note']}")


@command
def compile(argv):
  """Pre-flight for a TPU topology (memory per chip, fits, 100%-MFU bound): loopjax compile --config X --topology v5p:4x4x4."""
  del argv
  _require("config")
  _require("topology")
  from loopjax.preflight import main as preflight_main
  return preflight_main(FLAGS.config, FLAGS.topology, FLAGS["config"].config_filename)


@command
def eval(argv):  # noqa: A001 - the subcommand's name
  """Evaluate a checkpoint at one or more loop counts: loopjax eval --checkpoint WORKDIR [--data X]."""
  del argv
  _require("checkpoint")
  import json
  import os

  import jax

  from loopjax import evaluation
  _enable_compile_cache(FLAGS.compile_cache)
  path = FLAGS.checkpoint
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  step, results = evaluation.evaluate_checkpoint(path, step=FLAGS.step, source=FLAGS.data,
                                                 loop_steps=FLAGS.loop_steps)
  if jax.process_index() == 0:
    print(f"checkpoint step {step} in {path}\n{evaluation.format_table(results)}")
    if FLAGS.output:
      with open(FLAGS.output, "a") as f:
        f.write(json.dumps({"step": step, **results}) + "\n")


@command
def params(argv):
  """Print the parameter count of a config: loopjax params --config configs/ouro_1p4b.py."""
  del argv
  _require("config")
  from loopjax.train.state import count_params
  print(f"{count_params(FLAGS.config.model):,}")


def prepare(argv) -> int:
  """Tokenize text/JSONL/Parquet into ArrayRecord shards: loopjax prepare INPUT... --output DIR."""
  from loopjax.data.prepare import main as prepare_main
  return prepare_main(argv)


def upscale(argv) -> int:
  """Duplicate layers checkpoint to checkpoint: loopjax upscale --from CKPT --to CKPT --layers 48."""
  from loopjax.upscale_checkpoint import main as upscale_main
  return upscale_main(argv)


PLAIN_COMMANDS = {"prepare": prepare, "upscale": upscale}  # parse their own arguments (argparse), no absl flags


def main():
  commands = {**COMMANDS, **PLAIN_COMMANDS}
  if len(sys.argv) < 2 or sys.argv[1] not in commands:
    names = "\n".join(f"  {name:12s} {fn.__doc__.splitlines()[0]}" for name, fn in commands.items())
    print(f"usage: loopjax <command> [--flags]\n\ncommands:\n{names}", file=sys.stderr)
    sys.exit(2)
  name, argv = sys.argv[1], sys.argv[2:]
  if name in PLAIN_COMMANDS:
    sys.exit(PLAIN_COMMANDS[name](argv))
  _define_run_flags()
  app.run(_with_clear_errors(COMMANDS[name]), argv=[f"loopjax {name}"] + argv)


def _with_clear_errors(fn):
  """A bad config, checkpoint or data file ends the command with its one-line message, not a traceback."""
  def run(argv):
    from loopjax.checkpoint import CheckpointError
    from loopjax.config import ConfigError
    from loopjax.data.records import CorpusError
    try:
      return fn(argv)
    except (ConfigError, CheckpointError, CorpusError) as error:
      print(f"loopjax {fn.__name__}: {error}", file=sys.stderr)
      sys.exit(2)
  return run


if __name__ == "__main__":
  main()
