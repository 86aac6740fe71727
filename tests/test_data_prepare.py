"""`prepare` on corpora written here (text, JSONL, Parquet) with the byte tokenizer and a BPE trained here."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from loopjax import cli
from loopjax.data import prepare, readers, records, tokenizer

TXT_SEPARATOR = "\n<doc>\n"


def write_corpus(root, num_docs: int = 12) -> tuple[list[str], int]:
  """Writes a.txt, b.jsonl and c.parquet under root; returns (non-empty documents in order, empties)."""
  os.makedirs(root, exist_ok=True)
  words = "loop step token exit gate shared layer depth ünïcödé 23 mod sum".split()
  rng = np.random.default_rng(0)
  docs = [" ".join(rng.choice(words, size=int(rng.integers(3, 60)))) for _ in range(3 * num_docs)]
  txt, jsonl, parquet = docs[:num_docs], docs[num_docs:2 * num_docs], docs[2 * num_docs:]
  with open(os.path.join(root, "a.txt"), "w", encoding="utf-8") as f:
    f.write(TXT_SEPARATOR.join(txt + ["   "]))  # a whitespace-only document at the end
  with open(os.path.join(root, "b.jsonl"), "w", encoding="utf-8") as f:
    for d in jsonl[:2] + [""] + jsonl[2:]:
      f.write(json.dumps({"id": 1, "text": d}) + "\n")
  pq.write_table(pa.table({"text": parquet + [None]}), os.path.join(root, "c.parquet"))
  return txt + jsonl + parquet, 3


def train_bpe(path, texts) -> str:
  """A small byte-level BPE tokenizer, trained here, saved as tokenizer.json."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(path))
  return str(path)


def read_corpus(out_dir) -> list[np.ndarray]:
  docs = records.corpus_documents(str(out_dir))
  return [docs[i]["tokens"] for i in range(len(docs))]


@pytest.fixture
def corpus(tmp_path):
  docs, empties = write_corpus(tmp_path / "in")
  return tmp_path / "in", docs, empties


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_prepare_round_trips_every_document(tmp_path, corpus, kind):
  in_dir, docs, empties = corpus
  spec = "byte" if kind == "byte" else train_bpe(tmp_path / "tok.json", docs)
  manifest = prepare.prepare([str(in_dir)], str(tmp_path / "out"), prepare.Options(
      tokenizer=spec, txt_separator=TXT_SEPARATOR), progress=False)
  assert manifest["documents"] == len(docs)
  assert manifest["skipped"] == {"empty_documents": empties, "one_token_documents": 0}
  assert manifest["dtype"] == "<u2" and len(manifest["shards"]) == 3
  tokens = read_corpus(tmp_path / "out")
  assert manifest["tokens"] == sum(map(len, tokens))
  bos = manifest["tokenizer"]["bos_id"]
  assert all(t[0] == bos for t in tokens)
  if kind == "byte":
    decoded = [bytes(t[1:].astype(np.uint8)).decode("utf-8") for t in tokens]
    assert bos == 256
  else:
    tok = tokenizers.Tokenizer.from_file(spec)
    decoded = [tok.decode(t[1:].tolist()) for t in tokens]
    assert bos == tok.token_to_id("<|endoftext|>")
    assert np.mean([len(t) for t in tokens]) < 0.6 * np.mean([len(d.encode()) for d in docs])
  assert decoded == docs


def test_rerun_reuses_verified_shards_and_rebuilds_a_corrupted_one(tmp_path, corpus):
  in_dir, _, _ = corpus
  out = str(tmp_path / "out")
  first = prepare.prepare([str(in_dir)], out, progress=False)
  before = read_corpus(out)
  assert prepare.prepare([str(in_dir)], out, progress=False)["reused_shards"] == 3
  shard = os.path.join(out, first["shards"][1]["path"])
  with open(shard, "r+b") as f:
    f.seek(40)
    byte = f.read(1)
    f.seek(40)
    f.write(bytes([byte[0] ^ 0xFF]))
  assert prepare.finished_shard(shard) is None
  again = prepare.prepare([str(in_dir)], out, progress=False)
  assert again["reused_shards"] == 2
  assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]
  assert all(np.array_equal(a, b) for a, b in zip(before, read_corpus(out)))


def test_worker_processes_write_the_same_shards(tmp_path, corpus):
  in_dir, _, _ = corpus
  serial = prepare.prepare([str(in_dir)], str(tmp_path / "serial"), progress=False)
  parallel = prepare.prepare([str(in_dir)], str(tmp_path / "parallel"), num_workers=2, progress=False)
  assert [s["sha256"] for s in serial["shards"]] == [s["sha256"] for s in parallel["shards"]]


def _write(path, data: bytes):
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


BAD_INPUTS = {
    "missing path": (lambda d: str(d / "nope.txt"), {}, "no such file or directory"),
    "jsonl that is not JSON": (lambda d: _write(d / "x.jsonl", b"plain text, not json\n"), {},
                               "not a JSON object"),
    "parquet that is not Parquet": (lambda d: _write(d / "x.parquet", b"hello"), {}, "not a Parquet file"),
    "invalid UTF-8": (lambda d: _write(d / "x.txt", b"caf\xe9 latin-1"), {}, "invalid UTF-8 at byte 3"),
    "invalid UTF-8 in JSONL": (lambda d: _write(d / "x.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
                               {}, "x.jsonl:2: invalid UTF-8"),
    "absent JSON field": (lambda d: _write(d / "x.jsonl", b'{"body": "hi"}\n'), {}, "no field 'text'"),
    "absent Parquet column": (lambda d: pq.write_table(pa.table({"body": ["hi"]}), d / "x.parquet")
                              or str(d / "x.parquet"), {}, "no column 'text'"),
    "unknown extension": (lambda d: _write(d / "x.csv", b"a,b"), {}, "unknown extension"),
    "missing tokenizer file": (lambda d: _write(d / "x.txt", b"hi"), {"tokenizer": "/nope/tok.json"},
                               "tokenizer file '/nope/tok.json' does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_the_file_and_the_fix(tmp_path, case):
  make_input, options, message = BAD_INPUTS[case]
  path = make_input(tmp_path)
  with pytest.raises((readers.InputError, tokenizer.TokenizerError)) as e:
    prepare.prepare([path], str(tmp_path / "out"), prepare.Options(**options), progress=False)
  assert message in str(e.value) and "Fix:" in str(e.value)
  assert not os.path.exists(tmp_path / "out" / records.MANIFEST)


def test_bos_token_missing_from_the_vocabulary_is_an_error(tmp_path, corpus):
  _, docs, _ = corpus
  spec = train_bpe(tmp_path / "tok.json", docs)
  with pytest.raises(tokenizer.TokenizerError, match="has no token '<s>'.*Fix:"):
    tokenizer.load(spec, bos_token="<s>")


def test_cli_reports_skips_and_errors(tmp_path, corpus, capsys):
  in_dir, docs, empties = corpus
  assert cli.run(["prepare", str(in_dir), "--output", str(tmp_path / "out"), "--num_workers", "0",
                  "--txt_separator", TXT_SEPARATOR, "--no_progress"]) == 0
  assert f"skipped {empties} empty" in capsys.readouterr().out
  assert cli.run(["prepare", str(tmp_path / "nope"), "--output", str(tmp_path / "o2"), "--no_progress"]) == 2
  assert "no such file or directory" in capsys.readouterr().err


def test_killed_prepare_leaves_nothing_that_passes_as_done(tmp_path):
  inputs = []
  for i in range(4):  # big enough that the run is still going when the first shard finishes
    path = tmp_path / f"in{i}.jsonl"
    line = json.dumps({"text": f"document {i} " + "word " * 60}) + "\n"
    path.write_text(line * 40_000)
    inputs.append(str(path))
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "loopjax.cli", "prepare", *inputs, "--output", str(out), "--num_workers",
         "0", "--no_progress"]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while not (out / ("shard-00000.arrayrecord" + records.DONE_SUFFIX)).exists():
    assert proc.poll() is None and time.time() < deadline, "prepare ended before it could be killed"
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / records.MANIFEST).exists()
  with pytest.raises(records.CorpusError, match="not a finished prepared corpus"):
    records.read_manifest(str(out))
  for name in os.listdir(out):
    if name.endswith(".arrayrecord"):
      summary = prepare.finished_shard(str(out / name))
      if summary is not None:  # anything that passes as done holds the whole input file
        assert summary["documents"] == 40_000
  manifest = prepare.prepare(inputs, str(out), progress=False)
  assert manifest["reused_shards"] >= 1 and manifest["documents"] == 4 * 40_000
  assert not [n for n in os.listdir(out) if ".tmp-" in n]
