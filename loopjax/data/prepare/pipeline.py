"""prepare as a Beam pipeline: input files -> one shard per file and split -> the manifest, written last.

    Create(files) -> Reshuffle -> ParDo(TokenizeFiles) -> ToList -> Map(write the corpus)

The unit of work is one input file (a corpus is thousands of them): its shards' names and bytes depend
on it alone, which makes retries harmless (shard.py). The Reshuffle spreads the files over the workers
(without it a runner may fuse the whole graph onto the worker that read the file list). The last step
runs once, on one worker, with every file's summary: the counts in the manifest are the pipeline's own.
"""

from loopjax.data.prepare import runner

with runner.quiet("", "apache_beam"):
  import apache_beam as beam

import os  # noqa: E402
import time  # noqa: E402

from loopjax.data import tokenizer  # noqa: E402
from loopjax.data.prepare import output as output_lib  # noqa: E402
from loopjax.data.prepare import shard  # noqa: E402

COUNTERS = "loopjax_prepare"  # Beam metrics: files_{reused,tokenized,failed}, file_{started,finished}_ms


class TokenizeFiles(beam.DoFn):
  """(index, input path) -> the file's summary, with its shards committed (shard.prepare_file)."""

  def __init__(self, output: str, options):
    self.output, self.options = output, options

  def setup(self):
    # One worker, one core: Beam scales by worker processes (one per vCPU on Dataflow), so the
    # tokenizer's own thread pool would only compete with the other workers for the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    self.tok = tokenizer.load(self.options.tokenizer, self.options.bos_token)  # once per worker

  def process(self, element):
    index, path = element
    started = time.time()
    summary = shard.prepare_file(index, path, self.output, self.options, self.tok)
    outcome = "failed" if summary.get("error") else "reused" if summary["reused"] else "tokenized"
    beam.metrics.Metrics.counter(COUNTERS, f"files_{outcome}").inc()
    beam.metrics.Metrics.distribution(COUNTERS, "file_started_ms").update(int(started * 1000))
    beam.metrics.Metrics.distribution(COUNTERS, "file_finished_ms").update(int(time.time() * 1000))
    yield summary


def _write_corpus(summaries: list[dict], output: str, tokenizer_spec: str):
  output_lib.write_corpus(output, summaries, tokenizer_spec)


def build(p: beam.Pipeline, files: list[str], output: str, options):
  """Adds prepare's transforms for `files` (in corpus order) to pipeline `p`."""
  summaries = (p
               | "Inputs" >> beam.Create(list(enumerate(files)))
               | "Spread" >> beam.Reshuffle()
               | "Tokenize" >> beam.ParDo(TokenizeFiles(output, options)))
  _ = (summaries
       | "Gather" >> beam.combiners.ToList()
       | "WriteManifest" >> beam.Map(_write_corpus, output, options.tokenizer))


def run_stats(result) -> dict:
  """From the run's Beam metrics: how many files were "reused", "tokenized" or "failed", and "busy_seconds",
  from the first file started to the last one finished (the run's wall time less the workers' start-up)."""
  metrics = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(COUNTERS))
  value = lambda m: m.committed if m.committed is not None else m.attempted  # noqa: E731
  stats = dict.fromkeys(("reused", "tokenized", "failed"), 0)
  for counter in metrics["counters"]:
    stats[counter.key.metric.name.removeprefix("files_")] += value(counter)
  times = {d.key.metric.name: value(d) for d in metrics["distributions"]}
  stats["busy_seconds"] = (times["file_finished_ms"].max - times["file_started_ms"].min) / 1000
  return stats
