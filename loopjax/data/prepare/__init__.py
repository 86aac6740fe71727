"""`loopjax prepare`: text / JSONL / Parquet files -> tokenized ArrayRecord shards plus a manifest, as an
Apache Beam pipeline (the `beam` extra), so the same command runs on this machine's cores or on a
Dataflow, Flink or Spark cluster.

  options.py   what prepare is asked to do, checked at start-up
  launch.py    prepare(): the start-up checks, the run, its outcome
  runner.py    the Beam runner and its pass-through options (the local runner by default)
  pipeline.py  the Beam graph: files -> TokenizeFiles -> manifest
  shard.py     one input file -> its shards, committed exactly once
  split.py     the held-out split (by a hash of the text) and document chunks
  output.py    the output directory: an existing corpus, leftovers, the manifests, the report

The format is records.py's (the reader's side). Only Beam-free modules are imported here, so that a
missing `beam` extra is reported in one line by prepare() instead of an ImportError.
"""

from loopjax.data.prepare.launch import prepare
from loopjax.data.prepare.options import Options, PrepareError
from loopjax.data.prepare.output import report

__all__ = ["Options", "PrepareError", "prepare", "report"]
