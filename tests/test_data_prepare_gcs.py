"""`prepare` reading its inputs and tokenizer from gs:// and writing the corpus there (fake-gcs-server, see
test_gcs.py), against the same pipeline on local copies: the same shard bytes, counts and records."""

import os

import numpy as np

from test_data_prepare import REFERENCE, TXT_SEPARATOR, TWO_WORKERS, outcome, shard_hashes
from test_gcs import _bucket_run, gcs  # noqa: F401 - gcs is a fixture

from loopjax import storage
from loopjax.data import prepare, records


def test_bucket_to_bucket_equals_local_and_reruns_as_a_no_op(gcs, tmp_path):  # noqa: F811
  bucket = _bucket_run("prepare")
  storage.copy_tree(REFERENCE, bucket)
  local = prepare.prepare([os.path.join(REFERENCE, "inputs")], str(tmp_path / "local"), prepare.Options(
      tokenizer=os.path.join(REFERENCE, "bpe400.json"), txt_separator=TXT_SEPARATOR, validation_fraction=0.3))
  options = prepare.Options(tokenizer=f"{bucket}/bpe400.json", txt_separator=TXT_SEPARATOR, validation_fraction=0.3)
  remote = prepare.prepare([f"{bucket}/inputs/*"], f"{bucket}/out", options, pipeline_args=TWO_WORKERS)
  assert outcome(remote) == {"reused": 0, "tokenized": 5, "failed": 0}
  for key in ("documents", "records", "tokens", "skipped", "tokenizer", "validation"):
    assert remote[key] == local[key], key
  assert [s["input"] for s in remote["shards"]] == [f"{bucket}/inputs/{n}" for n in
                                                    ("a.txt", "b.jsonl", "c.parquet", "d.jsonl.gz", "e.jsonl.zst")]
  copied = tmp_path / "copied"
  storage.copy_tree(f"{bucket}/out", copied)
  assert shard_hashes(copied) == shard_hashes(tmp_path / "local") and len(shard_hashes(copied)) == 10
  assert (copied / records.TOKENIZER).read_bytes() == open(os.path.join(REFERENCE, "bpe400.json"), "rb").read()
  for sub in ("", records.VALIDATION):  # read back by ArrayRecord's own GCS reader
    on_bucket = records.corpus_documents(f"{bucket}/out/{sub}".rstrip("/"))
    on_disk = records.corpus_documents(str(tmp_path / "local" / sub))
    assert len(on_bucket) == len(on_disk) > 0
    for i in range(len(on_disk)):
      np.testing.assert_array_equal(on_bucket[i]["tokens"], on_disk[i]["tokens"])
  again = prepare.prepare([f"{bucket}/inputs/*"], f"{bucket}/out", options)
  assert outcome(again) == {"reused": 5, "tokenized": 0, "failed": 0}
  assert {k: v for k, v in again.items() if k != "run"} == {k: v for k, v in remote.items() if k != "run"}
