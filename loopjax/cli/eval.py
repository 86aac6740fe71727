"""Evaluate a checkpoint at one or more loop counts: loopjax eval --checkpoint WORKDIR [--data X].

Uses the run's own saved config; --data and --loop_steps replace its eval.source and eval.loop_steps.
"""

import json
import os

from loopjax.cli import runtime


def add_arguments(parser):
  parser.add_argument("--checkpoint", required=True, help="a run's workdir or its checkpoints directory")
  parser.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the newest)")
  parser.add_argument("--data", default="", help="held-out data (a task or corpus dirs); default: the run's")
  parser.add_argument("--loop_steps", default="", help="loop counts to evaluate at, e.g. 1,2,4,8")
  parser.add_argument("--output", default="", help="also append the results as a JSON line to this file")
  runtime.add_compile_cache_argument(parser)


def run(args) -> int:
  import jax

  from loopjax import evaluation
  runtime.enable_compile_cache(args.compile_cache)
  runtime.allow_grain_workers()
  path = args.checkpoint
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  step, results = evaluation.evaluate_checkpoint(path, step=args.step, source=args.data,
                                                 loop_steps=args.loop_steps)
  if jax.process_index() == 0:
    print(f"checkpoint step {step} in {path}\n{evaluation.format_table(results)}")
    if args.output:
      with open(args.output, "a") as f:
        f.write(json.dumps({"step": step, **results}) + "\n")
  return 0
