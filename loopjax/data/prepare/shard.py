"""One input file -> its shards: the training shard, plus the validation shard when documents are held out.

Exactly once without coordination. A file's shards are named by the file's index in the input list, and
their bytes depend on nothing but that file and the options, so a retried bundle (Beam reruns a failed
one; a runner may run a straggler's backup beside it) writes the same bytes under the same names, never
a second copy of a document. Each attempt writes under its own temporary name and commits in one atomic
step: a rename on disk, a single-object upload on gs:// (an object appears whole or not at all). The
sidecar `<shard>.done.json`, written after the shards, holds their sha256 and the input's fingerprint: a
re-run after a kill reuses a file's shards only when both still match, and redoes the rest.

Bad input does not raise here: the summary carries the error (the first bad record in `fail` mode, or a
file no option makes readable) and nothing of that file is committed, so the launcher can report it in
one line, whichever runner ran the pipeline, and the other files' shards are kept for the re-run.
"""

import os
import tempfile
import uuid

from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from loopjax import storage
from loopjax.data import readers, records
from loopjax.data import tokenizer as tokenizer_lib
from loopjax.data.prepare import split as split_lib

SHARD = "shard-{:05d}.arrayrecord"
SKIP_REASONS = ("empty_documents", "one_token_documents") + readers.BAD_RECORD_REASONS
_ENCODE_BATCH = 256  # documents per call of the tokenizer's batch encoder


def split_dir(output: str, split: str) -> epath.Path:
  """Where a split's corpus lives: the output itself for training, `validation/` under it."""
  root = storage.run_path(output)
  return root if split == split_lib.TRAIN else root / split_lib.VALIDATION


def fingerprint(input_path: str, options, tokenizer_identity: dict) -> dict:
  stat = epath.Path(input_path).stat()
  return {"input": input_path, "input_bytes": stat.length, "input_mtime": stat.mtime,
          "options": options.identity(), "tokenizer": tokenizer_identity}


def _sidecar(output: str, index: int) -> epath.Path:
  return split_dir(output, split_lib.TRAIN) / (SHARD.format(index) + records.DONE_SUFFIX)


def finished(output: str, index: int, expected: dict | None = None) -> dict | None:
  """The sidecar summary of file `index` if its shards are complete and verified (and were made from
  the input and options `expected` fingerprints), else None."""
  try:
    summary = records.read_json(_sidecar(output, index))
  except (OSError, ValueError):
    return None
  if expected is not None and summary.get("fingerprint") != expected:
    return None
  for name, shard in summary["splits"].items():
    path = split_dir(output, name) / shard["path"]
    if not path.exists() or records.sha256_file(os.fspath(path)) != shard["sha256"]:
      return None
  return summary


class _ShardWriter:
  """One split's shard of one file, written to a local temporary file, with its counts."""

  def __init__(self, path: str, dtype, chunk_tokens: int):
    self.path, self.dtype, self.chunk_tokens = path, dtype, chunk_tokens
    self.writer = ArrayRecordWriter(path, "group_size:1")
    self.counts = {"documents": 0, "records": 0, "tokens": 0, "text_bytes": 0, "max_document_tokens": 0}
    self.texts = []

  def write(self, ids):
    for chunk in split_lib.chunks(ids, self.chunk_tokens):
      self.writer.write(chunk.astype(self.dtype).tobytes())
      self.counts["records"] += 1
    self.counts["documents"] += 1
    self.counts["tokens"] += len(ids)
    self.counts["max_document_tokens"] = max(self.counts["max_document_tokens"], len(ids))

  def close(self, name: str) -> dict:
    self.writer.close()
    return {**self.counts, "path": name, "bytes": os.path.getsize(self.path),
            "sha256": records.sha256_file(self.path)}


def _tokenize(input_path: str, options, tok, writers: dict[str, _ShardWriter]) -> dict:
  """Reads, splits and tokenizes the file into `writers`; the skip counts. Raises readers.InputError on
  an unreadable file, or on the first bad record when options.on_bad_record is "fail"."""
  skipped = dict.fromkeys(SKIP_REASONS, 0)

  def flush(writer):
    for ids in tok.encode_batch(writer.texts):
      ids = tokenizer_lib.with_bos(ids, tok.bos_id)
      if len(ids) < 2:  # no target
        skipped["one_token_documents"] += 1
      else:
        writer.write(ids)
    writer.texts = []

  for record in readers.read_documents(input_path, text_field=options.text_field,
                                       txt_separator=options.txt_separator):
    if record is None:
      skipped["empty_documents"] += 1
    elif isinstance(record, readers.BadRecord):
      if options.on_bad_record == "fail":
        raise readers.InputError(record.message)
      skipped[record.reason] += 1
    else:
      writer = writers[split_lib.split_of(record, options.validation_fraction)]
      writer.texts.append(record)
      writer.counts["text_bytes"] += len(record.encode("utf-8"))
      if len(writer.texts) == _ENCODE_BATCH:
        flush(writer)
  for writer in writers.values():
    flush(writer)
  return skipped


def _commit(local: str, target: epath.Path):
  """Moves a finished local file to its final name in one atomic step."""
  if storage.is_remote(target):
    storage.copy_file(local, target)  # one object upload: the object appears whole or not at all
  else:
    os.replace(local, target)


def prepare_file(index: int, input_path: str, output: str, options, tok) -> dict:
  """Tokenizes input file `index` into its shards, unless verified identical ones exist; its summary,
  with "error" set (and nothing committed) when the file holds bad input."""
  expected = fingerprint(input_path, options, tok.identity())
  done = finished(output, index, expected)
  if done is not None:
    return {**done, "reused": True}
  names = [split_lib.TRAIN] + ([split_lib.VALIDATION] if options.validation_fraction > 0 else [])
  remote = storage.is_remote(output)
  scratch = tempfile.mkdtemp(prefix="loopjax-prepare-") if remote else None
  finals = {name: split_dir(output, name) / SHARD.format(index) for name in names}
  temps = {name: os.path.join(scratch, f"{name}.arrayrecord") if remote
           else f"{finals[name]}.tmp-{uuid.uuid4().hex}" for name in names}
  try:
    if not remote:
      for name in names:
        finals[name].parent.mkdir(parents=True, exist_ok=True)
    dtype = records.token_dtype(tok.vocab_size)
    writers = {name: _ShardWriter(temps[name], dtype, options.chunk_tokens) for name in names}
    try:
      skipped = _tokenize(input_path, options, tok, writers)
    except readers.InputError as e:
      for writer in writers.values():
        writer.writer.close()  # the temporary file is removed below
      return {"index": index, "input": input_path, "error": str(e)}
    summary = {"index": index, "input": input_path, "fingerprint": expected, "skipped": skipped,
               "splits": {name: writers[name].close(SHARD.format(index)) for name in names}}
    for name in names:
      _commit(temps[name], finals[name])
  finally:
    for path in temps.values():
      if os.path.exists(path):
        os.remove(path)
    if scratch:
      os.rmdir(scratch)
  records.write_json_atomic(_sidecar(output, index), summary)
  return {**summary, "reused": False}
