"""The on-disk form of a prepared corpus: ArrayRecord shards of token ids plus a manifest.

A prepared directory holds `shard-NNNNN.arrayrecord` files (one record per document: its token ids as
little-endian uint16, or uint32 when the vocabulary needs it), one `<shard>.done.json` per finished
shard, and `manifest.json`, written last. Only a directory with a manifest is a corpus, and only a shard
whose bytes match its recorded sha256 counts as done, so an interrupted prepare is never mistaken for a
finished one.
"""

import hashlib
import json
import os

import grain
import numpy as np

MANIFEST = "manifest.json"
FORMAT = "loopjax-tokens-v1"
DONE_SUFFIX = ".done.json"
TOKENIZER = "tokenizer.json"  # the HF tokenizer's copy beside a corpus prepared with one


class CorpusError(ValueError):
  """A prepared corpus that cannot be read; says what is wrong (naming the file) and the fix."""

  def __init__(self, problem: str, fix: str):
    super().__init__(f"{problem}. Fix: {fix}")
    self.problem, self.fix = problem, fix


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON so that `path` either does not exist or holds the whole file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_manifest(corpus_dir: str) -> dict:
  """The manifest of a prepared corpus, or a CorpusError saying what is wrong and what to run."""
  if not os.path.isdir(corpus_dir):
    raise CorpusError(f"{corpus_dir!r} is neither a directory nor a built-in task",
                      "give the output directory of `loopjax prepare`, or a task: mano, multihop, capo")
  path = os.path.join(corpus_dir, MANIFEST)
  if not os.path.exists(path):
    raise CorpusError(f"{path} does not exist: {corpus_dir!r} is not a finished prepared corpus "
                      "(prepare may have been interrupted)", "run `loopjax prepare` into it again")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CorpusError(f"{path} is not valid JSON ({e})", "re-run `loopjax prepare`") from e
  if manifest.get("format") != FORMAT:
    raise CorpusError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}",
                      "re-run `loopjax prepare` with this version of loopjax")
  for shard in manifest["shards"]:
    shard_path = os.path.join(corpus_dir, shard["path"])
    if not os.path.exists(shard_path) or os.path.getsize(shard_path) != shard["bytes"]:
      raise CorpusError(f"shard {shard_path} is missing or has the wrong size",
                        "re-run `loopjax prepare` into the same directory to rebuild it")
  if manifest["documents"] == 0:
    raise CorpusError(f"{path} lists no documents", "prepare a corpus with non-empty documents")
  return manifest


def _decode(record: bytes, dtype: np.dtype) -> dict:
  return {"tokens": np.frombuffer(record, dtype=dtype).astype(np.int32)}


def corpus_documents(corpus_dir: str) -> grain.MapDataset:
  """A MapDataset of {"tokens": int32[n]} over all shards of a prepared corpus, in manifest order."""
  manifest = read_manifest(corpus_dir)
  paths = [os.path.join(corpus_dir, s["path"]) for s in manifest["shards"] if s["documents"]]
  dtype = np.dtype(manifest["dtype"])
  source = grain.sources.ArrayRecordDataSource(paths)
  return grain.MapDataset.source(source).map(lambda record: _decode(record, dtype))
