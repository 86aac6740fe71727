"""The on-disk form of a prepared corpus: ArrayRecord shards of token ids plus a manifest.

A prepared directory holds `shard-NNNNN.arrayrecord` files (one record per document, or per chunk of one
with `prepare --chunk_tokens`: its token ids as little-endian uint16, or uint32 when the vocabulary
needs it), one `<shard>.done.json` per finished shard, and `manifest.json`, written last; with
`prepare --validation_fraction`, a `validation/` corpus of the same form holds the held-out documents.
Only a directory with a manifest is a corpus, and only a shard whose bytes match its recorded sha256
counts as done, so an interrupted prepare is never mistaken for a finished one (BUILD.md, "Preparing
corpora", lists every file).
"""

import hashlib
import json
import os
import uuid

import numpy as np
from etils import epath

from loopjax import storage

MANIFEST = "manifest.json"
FORMAT = "loopjax-tokens-v1"
DONE_SUFFIX = ".done.json"
TOKENIZER = "tokenizer.json"  # the HF tokenizer's copy beside a corpus prepared with one
VALIDATION = "validation"  # the held-out split prepare writes under a corpus (--validation_fraction)


class CorpusError(ValueError):
  """A prepared corpus that cannot be read; says what is wrong (naming the file) and the fix."""

  def __init__(self, problem: str, fix: str):
    super().__init__(f"{problem}. Fix: {fix}")
    self.problem, self.fix = problem, fix


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def sha256_file(path: str) -> str:
  """The hex sha256 of a local file or a gs:// object (read through epath, 1 MiB at a time)."""
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_json_atomic(path, obj) -> None:
  """Writes JSON so that `path` (local or gs://) either does not exist or holds the whole file: on disk a
  temporary file renamed into place, on a bucket one object upload (whole or absent)."""
  text = json.dumps(obj, indent=1, sort_keys=True)
  if storage.is_remote(path):
    epath.Path(path).write_text(text)
    return
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path):
  """The JSON object in a local or gs:// file."""
  return json.loads(epath.Path(path).read_text())


def read_manifest(corpus_dir: str) -> dict:
  """The manifest of a prepared corpus, or a CorpusError saying what is wrong and what to run.

  `corpus_dir` may be a gs:// prefix: the manifest is read through epath (gcsfs) and the shards by
  ArrayRecord's own GCS reader (see `corpus_documents`).
  """
  kind = storage.scheme(corpus_dir)
  if kind and kind not in storage.REMOTE_SCHEMES:
    raise CorpusError(f"{corpus_dir!r}: the {kind}:// scheme is not supported",
                      "use a local directory, a mount (e.g. gcsfuse) or a gs:// prefix")
  root = epath.Path(corpus_dir)
  if not root.is_dir():
    raise CorpusError(f"{corpus_dir!r} is neither a directory nor a built-in task",
                      "give the output directory of `loopjax prepare`, or a task: mano, multihop, capo")
  path = root / MANIFEST
  if not path.exists():
    raise CorpusError(f"{path} does not exist: {corpus_dir!r} is not a finished prepared corpus "
                      "(prepare may have been interrupted)", "run `loopjax prepare` into it again")
  try:
    manifest = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CorpusError(f"{path} is not valid JSON ({e})", "re-run `loopjax prepare`") from e
  if manifest.get("format") != FORMAT:
    raise CorpusError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}",
                      "re-run `loopjax prepare` with this version of loopjax")
  for shard in manifest["shards"]:
    shard_path = root / shard["path"]
    if not shard_path.exists() or shard_path.stat().length != shard["bytes"]:
      raise CorpusError(f"shard {shard_path} is missing or has the wrong size",
                        "re-run `loopjax prepare` into the same directory to rebuild it")
  if manifest.get("split") == VALIDATION and not (root.parent / MANIFEST).exists():
    raise CorpusError(f"{corpus_dir!r} is the held-out split of an unfinished corpus ({root.parent / MANIFEST} "
                      "does not exist)", "run `loopjax prepare` into its parent again")
  if manifest["documents"] == 0:
    raise CorpusError(f"{path} lists no documents", "prepare a corpus with non-empty documents")
  return manifest


def validation_source(names: list[str]) -> str:
  """The held-out splits of the corpora `names` ("a/validation,b/validation") when prepare held documents
  out of every one of them (a mixture keeps its weights); "" otherwise (a task, or a corpus without one)."""
  held_out = []
  for name in names:
    try:
      split = read_json(storage.run_path(name) / MANIFEST).get("validation")
    except (OSError, ValueError):  # a task name, or no corpus there
      return ""
    if not split or not split["documents"]:
      return ""
    held_out.append(f"{name.rstrip('/')}/{split['path']}")
  return ",".join(held_out)


def _decode(record: bytes, dtype: np.dtype) -> dict:
  return {"tokens": np.frombuffer(record, dtype=dtype).astype(np.int32)}


def corpus_documents(corpus_dir: str) -> "grain.MapDataset":
  """A MapDataset of {"tokens": int32[n]} over all shards of a prepared corpus, in manifest order.

  gs:// shards are read by ArrayRecord's built-in GCS reader (riegeli's GcsReader, google-cloud-cpp:
  Application Default Credentials; an emulator through CLOUD_STORAGE_EMULATOR_ENDPOINT), one ranged
  read per record.
  """
  import grain  # here, not at the top: prepare's Beam workers read this module's format, not grain's
  manifest = read_manifest(corpus_dir)
  paths = [os.path.join(corpus_dir, s["path"]) for s in manifest["shards"] if s["documents"]]
  dtype = np.dtype(manifest["dtype"])
  source = grain.sources.ArrayRecordDataSource(paths)
  return grain.MapDataset.source(source).map(lambda record: _decode(record, dtype))
