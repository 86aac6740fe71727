"""Tokenize text/JSONL/Parquet into ArrayRecord shards: loopjax prepare INPUT... --output DIR [Beam flags].

An Apache Beam pipeline (pip install 'loopjax[beam]'). Inputs are files, directories or globs, local or
gs:// (.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet); the output is a directory or a gs:// prefix. By
default it runs here, one worker process per CPU core; any other Beam runner takes the same command:

  loopjax prepare 'gs://B/raw/*.jsonl.zst' --output gs://B/corpus --tokenizer gs://B/tokenizer.json \\
      --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp \\
      --sdk_container_image=IMAGE_WITH_LOOPJAX

Flags prepare does not know are Beam pipeline options (write them as --flag=value). A re-run of a
finished output does nothing; one after a kill reuses every finished file. Empty, one-token and (with
--on_bad_record=skip) bad records are skipped and counted in the closing report and the manifest.
"""

import os

PASSES_UNKNOWN_FLAGS = True  # the Beam pipeline options, handed to prepare as args.pipeline_args


def add_arguments(parser):
  from loopjax.data import tokenizer
  from loopjax.data.prepare import options
  defaults = options.Options()
  parser.add_argument("inputs", nargs="+", help="files, directories or globs, local or gs://")
  parser.add_argument("--output", required=True, help="directory (or gs:// prefix) for shards and manifest.json")
  parser.add_argument("--tokenizer", default=tokenizer.BYTE, help="'byte' or a tokenizer.json path (local or gs://)")
  parser.add_argument("--text_field", default=defaults.text_field, help="JSONL field / Parquet column with the text")
  parser.add_argument("--txt_separator", default=None, help="split .txt files into documents here")
  parser.add_argument("--bos_token", default=None, help="document-start token ('' for none)")
  parser.add_argument("--on_bad_record", default=defaults.on_bad_record, choices=options.ON_BAD_RECORD,
                      help="a line that is not JSON, lacks the text field or is not UTF-8: stop (fail) or "
                           "count it and go on (skip)")
  parser.add_argument("--validation_fraction", type=float, default=defaults.validation_fraction,
                      help="hold out this share of documents into DIR/validation (by a hash of the text; "
                           "eval.source defaults to it)")
  parser.add_argument("--chunk_tokens", type=int, default=defaults.chunk_tokens,
                      help="store documents as chunks of at most this many targets (give train.seq_len), "
                           "so a long document's rows are shuffled apart; 0 = whole documents")
  parser.add_argument("--runner", default="DirectRunner",
                      help="Beam runner: DirectRunner (here; --direct_num_workers=N, default one per core), "
                           "DataflowRunner, FlinkRunner, SparkRunner, PortableRunner")


def run(args) -> int:
  from loopjax.data import prepare
  options = prepare.Options(args.tokenizer, args.text_field, args.txt_separator, args.bos_token,
                            args.on_bad_record, args.validation_fraction, args.chunk_tokens)
  manifest = prepare.prepare(args.inputs, args.output, options, verbose=args.verbose,
                             pipeline_args=[f"--runner={args.runner}", *args.pipeline_args],
                             default_workers=os.cpu_count() or 1)
  print(prepare.report(manifest, manifest["run"]))
  return 0
