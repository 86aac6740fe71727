"""Train (or continue training) a model: loopjax train --config configs/smoke.py --workdir DIR.

The run resumes from the newest complete checkpoint in WORKDIR/checkpoints. Metrics go to
WORKDIR/metrics.jsonl and WORKDIR/tensorboard; SIGTERM or Ctrl-C saves a checkpoint, then stops with
exit code 75 (EX_TEMPFAIL: run the same command again to continue); a run whose steps hang is stopped by
its watchdog with exit code 76 (run it again too). loopjax/cli/errors.py lists the codes.
"""

from loopjax.cli import config_args, runtime


def add_arguments(parser):
  config_args.add_arguments(parser)
  parser.add_argument("--workdir", required=True, help="directory for metrics, TensorBoard events and checkpoints")
  runtime.add_compile_cache_argument(parser)
  from loopjax import distributed
  distributed.add_arguments(parser)


def run(args) -> int:
  from loopjax import distributed
  distributed.initialize(distributed.settings_from(args))  # before anything touches the backend
  runtime.enable_compile_cache(args.compile_cache)
  runtime.allow_grain_workers()
  import jax

  from loopjax.train.driver import train
  result = train(args.config, args.workdir)
  if jax.process_index() == 0:
    from loopjax.cli.summary import format_summary
    print(format_summary(result), flush=True)
  from loopjax.cli.errors import EXIT_RETRY
  return EXIT_RETRY if result.preempted else 0

