"""The Beam runner that runs prepare, and its options: every flag after prepare's own passes through to Beam.

On this machine the local runner is Beam's FnApiRunner, named `DirectRunner` (the default) or
`FnApiRunner`. Beam's DirectRunner would first try PrismRunner, whose binary it downloads from GitHub
at run time, and fall back to the FnApiRunner when that fails; loopjax goes to the FnApiRunner directly,
so a local prepare never touches the network. `--direct_num_workers N` runs N worker processes (the
CLI's default: one per CPU core); with 1 the work runs inside this process. Any other runner
(DataflowRunner, FlinkRunner, SparkRunner, PortableRunner, PrismRunner) is Beam's own, with its flags.
"""

import contextlib
import logging
import os
import shlex
import sys


@contextlib.contextmanager
def quiet(*loggers: str):
  """Beam's import warns on the root logger that its BigQuery client libraries are missing (BigQuery
  IO is not used here), and its option parser warns about flags prepare refuses anyway."""
  saved = [(logging.getLogger(logger), logging.getLogger(logger).level) for logger in loggers]
  handlers = list(logging.getLogger().handlers)  # logging.warning() adds one to a bare root logger
  for logger, _ in saved:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for logger, level in saved:
      logger.setLevel(level)
    logging.getLogger().handlers[:] = handlers


with quiet("", "apache_beam"):
  import apache_beam as beam
  from apache_beam.options import pipeline_options as beam_options
  from apache_beam.runners import runner as beam_runner
  from apache_beam.runners.portability import local_job_service
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  from apache_beam.transforms import environments

from loopjax.data.prepare.options import PrepareError  # noqa: E402

LOCAL_RUNNERS = ("DirectRunner", "FnApiRunner")
_WORKERS_FLAG = "--direct_num_workers"


def pipeline_options(args: list[str], default_workers: int) -> beam_options.PipelineOptions:
  """Beam's options from the pass-through flags; PrepareError for a flag no Beam option knows (Beam
  itself would drop it with a warning, and a mistyped --direct_num_workers would go unnoticed)."""
  with quiet("apache_beam.options.pipeline_options"):
    options = beam_options.PipelineOptions(list(args))
    every = options.get_all_options(retain_unknown_options=True)
    known = options.get_all_options()
  unknown = sorted(set(every) - set(known))
  if unknown:
    raise PrepareError(f"--{unknown[0]} is neither a flag of prepare nor a Beam pipeline option. Fix: check "
                       "its spelling against `loopjax prepare --help` and Beam's pipeline options")
  standard = options.view_as(beam_options.StandardOptions)
  standard.runner = standard.runner or LOCAL_RUNNERS[0]
  if not any(arg.split("=")[0] == _WORKERS_FLAG for arg in args):
    options.view_as(beam_options.DirectOptions).direct_num_workers = default_workers
  options.view_as(beam_options.SetupOptions).save_main_session = False  # the DoFns live in loopjax
  return options


def name(options: beam_options.PipelineOptions) -> str:
  """The runner's name as given (`pipeline_options` sets the default)."""
  return options.view_as(beam_options.StandardOptions).runner


def make_runner(options: beam_options.PipelineOptions, worker_log: str | None):
  """The runner `options` names; PrepareError (one line) for one that does not exist or cannot load.

  worker_log: where the local runner's worker processes write their logs (their start-up logs Beam
  prints at INFO, whatever the level); None = this process's stderr.
  """
  runner_name = name(options)
  if runner_name in LOCAL_RUNNERS:
    workers = options.view_as(beam_options.DirectOptions).direct_num_workers or os.cpu_count()
    if workers == 1:
      return fn_runner.FnApiRunner()
    command = f"{shlex.quote(sys.executable)} -m apache_beam.runners.worker.sdk_worker_main"
    if worker_log:
      command += f" 2>>{shlex.quote(worker_log)}"
      logging.getLogger(local_job_service.__name__).setLevel(logging.ERROR)  # the workers' warnings, relayed
    logging.getLogger(fn_runner.__name__).setLevel(logging.ERROR)  # its advice to set direct_running_mode
    return fn_runner.FnApiRunner(default_environment=environments.SubprocessSDKEnvironment.from_command_string(command))
  try:
    return beam_runner.create_runner(runner_name)
  except (ValueError, ImportError) as e:
    first = str(e).split(". ")[0]
    raise PrepareError(f"--runner {runner_name}: {first}. Fix: use DirectRunner (this machine), DataflowRunner (with "
                       "pip install 'apache-beam[gcp]'), FlinkRunner, SparkRunner or PortableRunner") from None


def make_pipeline(options: beam_options.PipelineOptions, runner) -> "beam.Pipeline":
  """An empty pipeline on `runner`; PrepareError naming what the runner's options lack (Beam checks them
  here, e.g. DataflowRunner's project, region and temp_location)."""
  try:
    return beam.Pipeline(runner=runner, options=options)
  except ValueError as e:
    problems = "; ".join(line.strip().rstrip(".") for line in str(e).splitlines()[1:] if line.strip()) or str(e)
    raise PrepareError(f"--runner {name(options)}: {problems}. Fix: pass them as Beam flags (--flag=value; the README "
                       "shows the Dataflow command)") from None
