"""Evaluate a checkpoint at one or more loop counts: loopjax eval --checkpoint WORKDIR [--data X].

Uses the run's own saved config; --data and --loop_steps replace its eval.source and eval.loop_steps.
The checkpoint and --output may be local or gs:// (a line is appended to an object by rewriting it).
With --generate, a synthetic task's answers are generated greedily with Q-exit instead (exact match vs
the mean loop steps run, q = 0.1..0.9 and full depth), and the curve is appended to metrics.jsonl.
With --harness TASKS, lm-evaluation-harness tasks run at every --loop_steps and --exit_thresholds (the
`harness` extra; a checkpoint's rows go to its metrics.jsonl, and --hf DIR takes released Ouro weights).
"""

import json

from loopjax.cli import runtime
from loopjax.evaluation.harness import HarnessError


def add_arguments(parser):
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint", help="a run's workdir or its checkpoints directory")
  source.add_argument("--hf", help="with --harness: a HF Ouro directory (config.json + *.safetensors)")
  parser.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the newest)")
  parser.add_argument("--data", default="", help="held-out data (a task or corpus dirs); default: the run's")
  parser.add_argument("--loop_steps", default="", help="loop counts to evaluate at, e.g. 1,2,4,8")
  parser.add_argument("--output", default="", help="also append the results as a JSON line to this file")
  parser.add_argument("--generate", action="store_true",
                      help="instead: score the synthetic task's answers by greedy decoding with Q-exit at "
                           "q = 0.1..0.9 and at full depth (exact match vs mean depth, appended to the "
                           "run's metrics.jsonl)")
  parser.add_argument("--questions", type=int, default=256, help="with --generate: held-out questions")
  parser.add_argument("--harness", default="", metavar="TASKS",
                      help="instead: lm-eval tasks (comma-separated) at every T of --loop_steps and every q of "
                           "--exit_thresholds, e.g. multihop_mc,multihop_rolling,multihop_gen (shipped) or hellaswag")
  parser.add_argument("--include_path", default="", help="with --harness: a folder of your own lm-eval task YAMLs")
  parser.add_argument("--exit_thresholds", default="", help="with --harness: Q-exit thresholds at the trained T, "
                      "e.g. 0.3,0.5,0.7")
  parser.add_argument("--limit", type=int, default=None, help="with --harness: documents per task (default: all)")
  parser.add_argument("--tokenizer", default="", help="with --harness: 'byte' or a tokenizer.json (default: the "
                      "run's, or the HF directory's)")
  parser.add_argument("--batch_size", type=int, default=32, help="with --harness: rows per forward")
  runtime.add_compile_cache_argument(parser)


def run(args) -> int:
  import jax

  from loopjax import storage
  from loopjax.evaluation import teacher_forced
  runtime.enable_compile_cache(args.compile_cache)
  if args.harness:
    return run_harness(args)
  if args.hf:
    raise HarnessError("--hf: only --harness evaluates HF weights. Fix: add --harness TASKS, or give --checkpoint")
  if args.generate:
    return run_generate(args)
  runtime.allow_grain_workers()
  path = str(storage.checkpoints_dir(args.checkpoint))
  step, results = teacher_forced.evaluate_checkpoint(path, step=args.step, source=args.data,
                                                     loop_steps=args.loop_steps)
  if jax.process_index() == 0:
    print(f"checkpoint step {step} in {path}\n{teacher_forced.format_table(results)}")
    if args.output:
      storage.append_line(storage.run_path(args.output), json.dumps({"step": step, **results}) + "\n")
  return 0


def run_generate(args) -> int:
  """`--generate`: the exact-match vs depth curve of greedy decoding, printed and appended to metrics.jsonl."""
  from loopjax import storage
  from loopjax.evaluation import generation, teacher_forced
  from loopjax.infer import load
  source = load.from_checkpoint(args.checkpoint, args.step)
  cfg = source.run_config
  cfg.eval.source = args.data or cfg.eval.source
  cfg.eval.loop_steps = args.loop_steps or cfg.eval.loop_steps
  results = generation.evaluate(source, cfg, teacher_forced.eval_loop_steps(cfg), args.questions)
  print(f"checkpoint step {source.step} in {args.checkpoint}\n{generation.format_table(results)}")
  line = json.dumps({"step": source.step, **results}) + "\n"
  targets = [storage.run_path(source.workdir) / "metrics.jsonl"] + ([storage.run_path(args.output)] if args.output else [])
  for path in targets:
    storage.append_line(path, line)
  return 0


def run_harness(args) -> int:
  """`--harness`: the tasks at every depth in one process: a table, and a metrics row for a checkpoint."""
  import jax

  from loopjax import storage
  from loopjax.evaluation.harness import model, sweep
  from loopjax.evaluation.harness.depth import sweep_depths
  sweep_depths(args.loop_steps, args.exit_thresholds, trained_steps=1)  # the flags, the model's tokenizer, the tasks
  source = model.load_source(checkpoint=args.checkpoint or "", hf=args.hf or "", step=args.step,
                             tokenizer=args.tokenizer)
  tasks = sweep.load_tasks([t.strip() for t in args.harness.split(",") if t.strip()], args.include_path)
  loaded = model.from_source(source)
  depths = sweep_depths(args.loop_steps, args.exit_thresholds, loaded.model_cfg.loop_steps)
  results = sweep.Sweep(loaded, tasks, depths, batch_rows=args.batch_size, limit=args.limit)()
  if jax.process_index() != 0:
    return 0
  print(f"{args.checkpoint or args.hf}" + (f" step {source.step}" if source.step is not None else "")
        + f"\n{sweep.format_table(results)}")
  line = json.dumps({"step": source.step, **results}) + "\n"
  targets = (([storage.run_path(source.workdir) / "metrics.jsonl"] if source.workdir else [])
             + ([storage.run_path(args.output)] if args.output else []))
  for path in targets:
    storage.append_line(path, line)
  return 0
