"""Evaluate a checkpoint at one or more loop counts: loopjax eval --checkpoint WORKDIR [--data X].

Uses the run's own saved config; --data and --loop_steps replace its eval.source and eval.loop_steps.
The checkpoint and --output may be local or gs:// (a line is appended to an object by rewriting it).
With --generate, a synthetic task's answers are generated greedily with Q-exit instead (exact match vs
the mean loop steps run, q = 0.1..0.9 and full depth), and the curve is appended to metrics.jsonl.
"""

import json

from loopjax.cli import runtime


def add_arguments(parser):
  parser.add_argument("--checkpoint", required=True, help="a run's workdir or its checkpoints directory")
  parser.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the newest)")
  parser.add_argument("--data", default="", help="held-out data (a task or corpus dirs); default: the run's")
  parser.add_argument("--loop_steps", default="", help="loop counts to evaluate at, e.g. 1,2,4,8")
  parser.add_argument("--output", default="", help="also append the results as a JSON line to this file")
  parser.add_argument("--generate", action="store_true",
                      help="instead: score the synthetic task's answers by greedy decoding with Q-exit at "
                           "q = 0.1..0.9 and at full depth (exact match vs mean depth, appended to the "
                           "run's metrics.jsonl)")
  parser.add_argument("--questions", type=int, default=256, help="with --generate: held-out questions")
  runtime.add_compile_cache_argument(parser)


def run(args) -> int:
  import jax

  from loopjax import evaluation, storage
  runtime.enable_compile_cache(args.compile_cache)
  if args.generate:
    return run_generate(args)
  runtime.allow_grain_workers()
  path = str(storage.checkpoints_dir(args.checkpoint))
  step, results = evaluation.evaluate_checkpoint(path, step=args.step, source=args.data,
                                                 loop_steps=args.loop_steps)
  if jax.process_index() == 0:
    print(f"checkpoint step {step} in {path}\n{evaluation.format_table(results)}")
    if args.output:
      storage.append_line(storage.run_path(args.output), json.dumps({"step": step, **results}) + "\n")
  return 0


def run_generate(args) -> int:
  """`--generate`: the exact-match vs depth curve of greedy decoding, printed and appended to metrics.jsonl."""
  from loopjax import evaluation, storage
  from loopjax.infer import eval_generate, load
  source = load.from_checkpoint(args.checkpoint, args.step)
  cfg = source.run_config
  cfg.eval.source = args.data or cfg.eval.source
  cfg.eval.loop_steps = args.loop_steps or cfg.eval.loop_steps
  results = eval_generate.evaluate(source, cfg, evaluation.eval_loop_steps(cfg), args.questions)
  print(f"checkpoint step {source.step} in {args.checkpoint}\n{eval_generate.format_table(results)}")
  line = json.dumps({"step": source.step, **results}) + "\n"
  targets = [storage.run_path(source.workdir) / "metrics.jsonl"] + ([storage.run_path(args.output)] if args.output else [])
  for path in targets:
    storage.append_line(path, line)
  return 0
