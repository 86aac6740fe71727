"""Reading documents out of text, JSONL and Parquet files, with errors that name the file and line.

Formats go by extension: `.txt` (the whole file is one document, or documents split by a separator
string), `.jsonl` (one JSON object per line, the text in a named field), `.parquet` (the text in a
named column). A file that is not what its extension says, invalid UTF-8 or an absent field is an error;
a document that is empty or all whitespace is yielded as None so the caller counts it as skipped.
"""

import json
import os
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

EXTENSIONS = (".txt", ".jsonl", ".parquet")
_PARQUET_BATCH_ROWS = 1024


class InputError(ValueError):
  """Bad input to prepare; the message names the file (and line) and the fix."""


def _text_or_none(text: str) -> str | None:
  return text if text.strip() else None


def _decode(data: bytes, where: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise InputError(f"{where}: invalid UTF-8 at byte {e.start} ({data[e.start:e.start + 4]!r}). "
                     "Fix: convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from e


def _read_txt(path: str, separator: str | None) -> Iterator[str | None]:
  with open(path, "rb") as f:
    text = _decode(f.read(), path)
  for doc in (text.split(separator) if separator else [text]):
    yield _text_or_none(doc)


def _read_jsonl(path: str, field: str) -> Iterator[str | None]:
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      where = f"{path}:{lineno}"
      line = _decode(line, where)
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise InputError(f"{where}: not a JSON object ({e.msg}); a .jsonl file needs one JSON object "
                         "per line. Fix: convert the file to JSON Lines or give it its real extension")
      if not isinstance(obj, dict) or field not in obj:
        present = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise InputError(f"{where}: no field {field!r} (found {present}). Fix: pass --text_field "
                         "with the name of the field that holds the text")
      if obj[field] is None:
        yield None
        continue
      if not isinstance(obj[field], str):
        raise InputError(f"{where}: field {field!r} is a {type(obj[field]).__name__}, not a string. "
                         "Fix: pass --text_field naming a text field")
      yield _text_or_none(obj[field])


def _read_parquet(path: str, column: str) -> Iterator[str | None]:
  try:
    parquet = pq.ParquetFile(path)
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


def read_documents(path: str, *, text_field: str, txt_separator: str | None) -> Iterator[str | None]:
  """The documents of one input file in order; None for an empty one."""
  ext = os.path.splitext(path)[1].lower()
  if ext == ".txt":
    return _read_txt(path, txt_separator)
  if ext == ".jsonl":
    return _read_jsonl(path, text_field)
  if ext == ".parquet":
    return _read_parquet(path, text_field)
  raise InputError(f"{path}: unknown extension {ext!r}. Fix: use one of {EXTENSIONS}")


def expand_inputs(inputs: list[str]) -> list[str]:
  """Files named directly, plus files with a known extension under named directories, sorted."""
  files = []
  for path in inputs:
    if os.path.isdir(path):
      found = sorted(os.path.join(root, n) for root, _, names in os.walk(path) for n in names
                     if os.path.splitext(n)[1].lower() in EXTENSIONS)
      if not found:
        raise InputError(f"{path}: directory has no {EXTENSIONS} files. Fix: point at the corpus files")
      files += found
    elif os.path.isfile(path):
      if os.path.splitext(path)[1].lower() not in EXTENSIONS:
        raise InputError(f"{path}: unknown extension. Fix: use one of {EXTENSIONS}")
      files.append(path)
    else:
      raise InputError(f"{path}: no such file or directory. Fix: check the input path")
  return files
