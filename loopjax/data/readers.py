"""Reading documents out of input files, local or gs://, with errors that name the file and line.

Formats go by extension: `.txt` (the whole file is one document, or documents split by a separator
string), `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one JSON object per line, the text in a named field) and
`.parquet` (the text in a named column). Two kinds of problem, because a corpus of thousands of files
crawled from the web has both:

- a bad *record* (a line that is not JSON, lacks the field or holds something else, invalid UTF-8) is
  yielded as a `BadRecord` with its reason, so prepare can stop on it (`--on_bad_record=fail`) or count
  it and go on (`skip`);
- a bad *file* (not what its extension says, no such column, unknown extension) raises InputError:
  no setting makes it readable.

An empty or all-whitespace document is yielded as None, so the caller counts it as skipped.
"""

import dataclasses
import glob
import gzip
import io
import json
import os
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath

from loopjax import storage

EXTENSIONS = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
BAD_RECORD_REASONS = ("invalid_json", "missing_field", "not_text", "invalid_utf8")
_PARQUET_BATCH_ROWS = 1024
_GLOB_CHARS = "*?["


class InputError(ValueError):
  """Bad input to prepare; the message names the file (and line) and the fix."""


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """A record that holds no usable text: `reason` is one of BAD_RECORD_REASONS; `message` names the
  file, the line and the fix."""
  reason: str
  message: str


def extension(path: str) -> str | None:
  """The EXTENSIONS entry `path` ends with, or None."""
  return next((e for e in EXTENSIONS if path.lower().endswith(e)), None)


def _text_or_none(text: str) -> str | None:
  return text if text.strip() else None


def _decode(data: bytes, where: str, offset: int = 0) -> str | BadRecord:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    return BadRecord("invalid_utf8", f"{where}: invalid UTF-8 at byte {offset + e.start} "
                     f"({data[e.start:e.start + 4]!r}). Fix: convert the file to UTF-8 (e.g. `iconv -f latin1 "
                     "-t utf-8`), or pass --on_bad_record=skip to count and skip such records")


def _read_txt(path: str, separator: str | None) -> Iterator[str | None | BadRecord]:
  data = epath.Path(path).read_bytes()
  sep = separator.encode("utf-8") if separator else b""
  offset = 0
  for part in data.split(sep) if sep else [data]:  # UTF-8 is self-synchronising: split bytes, then decode
    text = _decode(part, path, offset)
    yield text if isinstance(text, BadRecord) else _text_or_none(text)
    offset += len(part) + len(sep)


def _decompressed(path: str, f) -> tuple[io.BufferedIOBase, tuple]:
  """The byte stream of a JSONL file, decompressed by its extension, and the errors a damaged one raises."""
  if path.lower().endswith(".gz"):
    return gzip.GzipFile(fileobj=f), (EOFError, gzip.BadGzipFile)
  if path.lower().endswith(".zst"):
    import zstandard  # comes with apache-beam, so with the `beam` extra prepare needs
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f)), (zstandard.ZstdError,)
  return f, ()


def _jsonl_record(line: bytes, where: str, field: str) -> str | None | BadRecord:
  text = _decode(line, where)
  if isinstance(text, BadRecord):
    return text
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    return BadRecord("invalid_json", f"{where}: not a JSON object ({e.msg}); a .jsonl file needs one JSON "
                     "object per line. Fix: convert the file to JSON Lines or give it its real extension")
  if not isinstance(obj, dict) or field not in obj:
    present = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    return BadRecord("missing_field", f"{where}: no field {field!r} (found {present}). Fix: pass "
                     "--text_field with the name of the field that holds the text")
  if obj[field] is not None and not isinstance(obj[field], str):
    return BadRecord("not_text", f"{where}: field {field!r} is a {type(obj[field]).__name__}, not a string. "
                     "Fix: pass --text_field naming a text field")
  return None if obj[field] is None else _text_or_none(obj[field])


def _read_jsonl(path: str, field: str) -> Iterator[str | None | BadRecord]:
  lineno = 0
  with epath.Path(path).open("rb") as f:
    stream, damaged = _decompressed(path, f)
    try:
      for lineno, line in enumerate(stream, 1):
        if line.strip():  # a blank line is no record
          yield _jsonl_record(line, f"{path}:{lineno}", field)
    except damaged as e:
      raise InputError(f"{path}:{lineno + 1}: cannot decompress ({e}). Fix: re-download the file or give "
                       "it its real extension") from e


def _read_parquet(path: str, column: str) -> Iterator[str | None]:
  with epath.Path(path).open("rb") as f:
    try:
      parquet = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants for non-Parquet bytes
      raise InputError(f"{path}: not a Parquet file ({e}). Fix: give the file its real extension "
                       "or re-export it as Parquet") from e
    names = parquet.schema_arrow.names
    if column not in names:
      raise InputError(f"{path}: no column {column!r} (columns: {names}). Fix: pass --text_field with "
                       "the name of the column that holds the text")
    column_type = parquet.schema_arrow.field(column).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
      raise InputError(f"{path}: column {column!r} has type {column_type}, not string. Fix: pass "
                       "--text_field naming a text column")
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
      for text in batch.column(0).to_pylist():
        yield None if text is None else _text_or_none(text)


def read_documents(path: str, *, text_field: str, txt_separator: str | None) -> Iterator[str | None | BadRecord]:
  """The records of one input file in order: a document's text, None for an empty one, or a BadRecord."""
  ext = extension(path)
  if ext == ".txt":
    return _read_txt(path, txt_separator)
  if ext == ".parquet":
    return _read_parquet(path, text_field)
  if ext is not None:
    return _read_jsonl(path, text_field)
  raise InputError(f"{path}: unknown extension. Fix: use one of {EXTENSIONS}")


def _under(directory: epath.Path) -> list[str]:
  return [os.fspath(directory / rel) for rel in storage.files_under(directory) if extension(rel)]


def _matches(spec: str) -> list[str]:
  """The input files `spec` names: itself, those under a directory, or a glob's matches, sorted."""
  if any(c in spec for c in _GLOB_CHARS):
    if storage.is_remote(spec):
      parts = spec.split("/")
      first = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
      found = [os.fspath(p) for p in epath.Path("/".join(parts[:first])).glob("/".join(parts[first:]))]
    else:
      found = [os.path.abspath(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
    return sorted(p for p in found if extension(p))
  path = storage.run_path(spec)
  if path.is_dir():
    return sorted(_under(path))
  if path.exists() and not extension(spec):
    raise InputError(f"{spec}: unknown extension. Fix: use one of {EXTENSIONS}")
  return [os.fspath(path)] if path.exists() else []


def expand_inputs(inputs: list[str]) -> list[str]:
  """Local paths or gs:// URLs (files, directories searched recursively, globs) -> the input files in
  order: each argument's matches sorted, arguments in the order given."""
  files = []
  for spec in inputs:
    kind = storage.scheme(spec)
    if kind and kind not in storage.REMOTE_SCHEMES:
      raise InputError(f"{spec}: the {kind}:// scheme is not supported. Fix: use local paths or gs:// URLs")
    found = _matches(spec)
    if not found:
      raise InputError(f"{spec}: no such file, or no {EXTENSIONS} file in that directory or glob. Fix: "
                       "check the input path")
    files += found
  return files
