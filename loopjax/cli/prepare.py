"""Tokenize text/JSONL/Parquet into ArrayRecord shards: loopjax prepare INPUT... --output DIR.

One shard per input file, tokenized in parallel with --num_workers; a re-run reuses every shard that
is already complete. Empty and one-token documents are skipped and counted in the closing report.
"""


def add_arguments(parser):
  from loopjax.data import tokenizer
  parser.add_argument("inputs", nargs="+", help=".txt/.jsonl/.parquet files or directories")
  parser.add_argument("--output", required=True, help="directory for shards and manifest.json")
  parser.add_argument("--tokenizer", default=tokenizer.BYTE, help="'byte' or a tokenizer.json path")
  parser.add_argument("--text_field", default="text", help="JSONL field / Parquet column with the text")
  parser.add_argument("--txt_separator", default=None, help="split .txt files into documents here")
  parser.add_argument("--bos_token", default=None, help="document-start token ('' for none)")
  parser.add_argument("--num_workers", type=int, default=0,
                      help="tokenizer processes (0: in-process; HF tokenizers already use all cores)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def run(args) -> int:
  from loopjax.data import prepare
  options = prepare.Options(args.tokenizer, args.text_field, args.txt_separator, args.bos_token)
  manifest = prepare.prepare(args.inputs, args.output, options, num_workers=args.num_workers,
                             progress=not args.no_progress)
  print(prepare.report(manifest))
  return 0
