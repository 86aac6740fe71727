"""`prepare()`: start-up checks, then the Beam pipeline, then what it wrote.

Everything a user can get wrong is checked here, before the pipeline starts and before anything is
written: the options, Beam being installed, the runner and its flags, the inputs, the tokenizer and the
output directory. Each failure is one line naming the flag and the fix.
"""

import importlib.util
import logging
import os
import shutil
import tempfile

from loopjax import storage
from loopjax.data import readers, records, tokenizer
from loopjax.data.prepare import output as output_lib
from loopjax.data.prepare import shard
from loopjax.data.prepare.options import Options, PrepareError

log = logging.getLogger(__name__)


def _require_beam():
  if importlib.util.find_spec("apache_beam") is None:
    raise PrepareError("loopjax prepare runs on Apache Beam, which is not installed. Fix: pip install "
                       "'loopjax[beam]'")


def _check_reachable(runner_name: str, files: list[str], output: str, tokenizer_spec: str):
  """A runner other than the local one runs its workers on other machines, which cannot read this one's
  files: PrepareError (one line) for the first local path among the output, the tokenizer and the inputs."""
  named = [("--output", output)] + ([("--tokenizer", tokenizer_spec)] if tokenizer_spec != tokenizer.BYTE else [])
  for flag, path in named + [("input", f) for f in files]:
    if not storage.is_remote(path):
      raise PrepareError(f"{flag} {path} is on this machine, which the workers of --runner {runner_name} cannot "
                         "read. Fix: put it in a bucket (gs://...) and give that path")


def _outcome(output: str) -> dict:
  """The manifest the pipeline wrote; readers.InputError (one line) naming the first bad input if it
  wrote prepare_errors.json instead."""
  root = storage.run_path(output)
  storage.forget_listings(root)  # the workers wrote there; this process may have listed it before
  if (root / records.MANIFEST).exists():
    return records.read_json(root / records.MANIFEST)
  failed = records.read_json(root / output_lib.ERRORS)["errors"]
  more = f" (and {len(failed) - 1} more files: {root / output_lib.ERRORS})" if len(failed) > 1 else ""
  raise readers.InputError(failed[0]["error"] + more)


def prepare(inputs: list[str], output: str, options: Options = Options(), *, pipeline_args=(),
            default_workers: int = 1, verbose: bool = False) -> dict:
  """Prepares `inputs` (files, directories or globs; local or gs://) into `output`; the manifest, with
  "run": how many input files were tokenized, reused (already complete) or failed, and the seconds
  from the first file started to the last one finished.

  pipeline_args: Beam pipeline flags (--runner, --direct_num_workers, --project, ...).
  default_workers: local worker processes when pipeline_args does not say (1: inside this process).
  Raises PrepareError, readers.InputError or tokenizer.TokenizerError on bad input.
  """
  options.check()
  _require_beam()
  from loopjax.data.prepare import runner
  beam_options = runner.pipeline_options(list(pipeline_args), default_workers)
  worker_log = None if verbose else os.path.join(tempfile.gettempdir(), f"loopjax-prepare-workers-{os.getpid()}.log")
  beam_runner = runner.make_runner(beam_options, worker_log)
  for flag, path in [("--output", output), ("--tokenizer", options.tokenizer)] + [("input", s) for s in inputs]:
    if storage.is_remote(path):
      storage.check_endpoint(path, flag)  # before Beam's own checks, which retry for minutes (Dataflow's)
  p = runner.make_pipeline(beam_options, beam_runner)
  try:
    return _run(p, inputs, output, options, beam_options, worker_log)
  finally:  # Beam removes the pipeline's temporary directory in run() only: a refusal or a reuse kept one
    shutil.rmtree(p.local_tempdir, ignore_errors=True)


def _run(p, inputs: list[str], output: str, options: Options, beam_options, worker_log: str | None) -> dict:
  """prepare() once its pipeline exists: the input and output checks, then the run (or the corpus reused)."""
  from loopjax.data.prepare import pipeline, runner
  output = os.fspath(storage.run_path(output))
  storage.check_run_dir(output, "--output")
  files = readers.expand_inputs(inputs)
  tok = tokenizer.load(options.tokenizer, options.bos_token)
  if runner.name(beam_options) not in runner.LOCAL_RUNNERS:
    _check_reachable(runner.name(beam_options), files, output, options.tokenizer)
  identity = tok.identity()
  done = output_lib.existing_corpus(
      output, lambda: output_lib.source([shard.fingerprint(f, options, identity) for f in files]))
  if done is not None:
    return {**done, "run": {"reused": len(files), "tokenized": 0, "failed": 0, "busy_seconds": 0.0}}
  output_lib.clear_leftovers(output)
  pipeline.build(p, files, output, options)
  try:
    result = p.run()
    result.wait_until_finish()
  except Exception:
    if worker_log and os.path.exists(worker_log):
      log.error("the local workers' logs are in %s", worker_log)
    raise
  if worker_log and os.path.exists(worker_log):
    os.remove(worker_log)
  return {**_outcome(output), "run": pipeline.run_stats(result)}
