"""`prepare` as a Beam pipeline on the local runner, on corpora written here (text, JSONL plain / gzip /
zstd, Parquet) with the byte tokenizer and a BPE trained here.

The reference for the output is tests/fixtures/prepare_reference: what the single-process prepare this
pipeline replaced wrote for the same input (its README says how it was made).
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from loopjax import cli, config
from loopjax.data import prepare, readers, records, tokenizer
from loopjax.data.prepare import shard, split
from loopjax.evaluation import heldout

TXT_SEPARATOR = "\n<doc>\n"
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "prepare_reference")
TWO_WORKERS = ["--direct_num_workers=2"]


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


def outcome(manifest: dict) -> dict:
  """How many input files prepare() tokenized, reused and failed."""
  return {k: manifest["run"][k] for k in ("reused", "tokenized", "failed")}


def shard_hashes(out_dir) -> dict[str, str]:
  """{relative shard path: sha256} of a finished corpus and its validation split."""
  found = {}
  for sub in ("", records.VALIDATION):
    manifest_path = os.path.join(out_dir, sub, records.MANIFEST)
    if os.path.exists(manifest_path):
      found.update({os.path.join(sub, s["path"]): s["sha256"] for s in records.read_json(manifest_path)["shards"]})
  return found


@pytest.fixture
def corpus(tmp_path):
  docs, empties = write_corpus(tmp_path / "in")
  return tmp_path / "in", docs, empties


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_pipeline_output_equals_the_single_process_reference(tmp_path, kind):
  spec = "byte" if kind == "byte" else os.path.join(REFERENCE, "bpe400.json")
  manifest = prepare.prepare([os.path.join(REFERENCE, "inputs")], str(tmp_path / "out"),
                             prepare.Options(tokenizer=spec, txt_separator=TXT_SEPARATOR))
  reference = records.read_json(os.path.join(REFERENCE, f"manifest_{kind}.json"))
  for key in ("format", "tokenizer", "dtype", "documents", "tokens", "text_bytes", "max_document_tokens"):
    assert manifest[key] == reference[key], key
  assert {k: manifest["skipped"][k] for k in reference["skipped"]} == reference["skipped"]
  assert sum(manifest["skipped"].values()) == sum(reference["skipped"].values())
  shard_keys = ("path", "bytes", "sha256", "documents", "tokens")
  assert [{k: s[k] for k in shard_keys} for s in manifest["shards"]] == \
      [{k: s[k] for k in shard_keys} for s in reference["shards"]]
  assert [os.path.basename(s["input"]).split(".")[0] for s in manifest["shards"]] == list("abcde")
  expected = np.load(os.path.join(REFERENCE, "tokens.npz"))
  tokens = read_corpus(tmp_path / "out")
  assert [len(t) for t in tokens] == expected[f"{kind}_lengths"].tolist()
  np.testing.assert_array_equal(np.concatenate(tokens), expected[f"{kind}_tokens"])


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_prepare_round_trips_every_document(tmp_path, corpus, kind):
  in_dir, docs, empties = corpus
  spec = "byte" if kind == "byte" else train_bpe(tmp_path / "tok.json", docs)
  manifest = prepare.prepare([str(in_dir)], str(tmp_path / "out"), prepare.Options(
      tokenizer=spec, txt_separator=TXT_SEPARATOR))
  assert manifest["documents"] == manifest["records"] == len(docs)
  assert manifest["skipped"]["empty_documents"] == empties and manifest["dtype"] == "<u2"
  tokens = read_corpus(tmp_path / "out")
  assert manifest["tokens"] == sum(map(len, tokens))
  bos = manifest["tokenizer"]["bos_id"]
  assert all(t[0] == bos for t in tokens)
  if kind == "byte":
    decoded = [bytes(t[1:].astype(np.uint8)).decode("utf-8") for t in tokens]
  else:
    tok = tokenizers.Tokenizer.from_file(spec)
    decoded = [tok.decode(t[1:].tolist()) for t in tokens]
    assert bos == tok.token_to_id("<|endoftext|>")
  assert decoded == docs


def test_bos_token_missing_from_the_vocabulary_is_an_error(tmp_path, corpus):
  _, docs, _ = corpus
  spec = train_bpe(tmp_path / "tok.json", docs)
  with pytest.raises(tokenizer.TokenizerError, match="has no token '<s>'.*Fix:"):
    tokenizer.load(spec, bos_token="<s>")


def test_split_is_stable_across_runs_and_worker_counts(tmp_path):
  """The held-out documents (and every shard byte) are the same for 1 in-process worker, 2 worker
  processes and a second run; the split holds about the fraction asked for, chosen by the text."""
  options = prepare.Options(txt_separator=TXT_SEPARATOR, validation_fraction=0.3)
  inputs = [os.path.join(REFERENCE, "inputs")]
  one = prepare.prepare(inputs, str(tmp_path / "one"), options)
  two = prepare.prepare(inputs, str(tmp_path / "two"), options, pipeline_args=TWO_WORKERS)
  again = prepare.prepare(inputs, str(tmp_path / "again"), options)
  assert outcome(two) == {"reused": 0, "tokenized": 5, "failed": 0}
  hashes = shard_hashes(tmp_path / "one")
  assert len(hashes) == 10 and hashes == shard_hashes(tmp_path / "two") == shard_hashes(tmp_path / "again")
  held_out = one["validation"]["documents"]
  assert held_out == two["validation"]["documents"] == again["validation"]["documents"]
  assert 0.15 * 40 <= held_out <= 0.45 * 40 and one["documents"] + held_out == 40
  texts = [bytes(t[1:].astype(np.uint8)).decode() for t in read_corpus(tmp_path / "one" / records.VALIDATION)]
  assert all(split.split_of(t, 0.3) == split.VALIDATION for t in texts)
  train = {bytes(t[1:].astype(np.uint8)).decode() for t in read_corpus(tmp_path / "one")}
  assert not train & set(texts)


@pytest.fixture
def beam_temps(tmp_path, monkeypatch):
  """The temporary directories Beam's pipelines leave (it makes one per Pipeline and removes it in run()
  only), in a temp dir of the test's own: a refused or reused prepare must leave none."""
  own = tmp_path / "tmp"
  own.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(own))
  return lambda: sorted(n for n in os.listdir(own) if n.startswith("beam-pipeline-temp"))


def test_rerun_of_a_finished_output_is_a_no_op_and_another_corpus_is_refused(tmp_path, corpus, capsys, beam_temps):
  in_dir, _, _ = corpus
  out = str(tmp_path / "out")
  first = prepare.prepare([str(in_dir)], out)
  stamps = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)}
  again = prepare.prepare([str(in_dir)], out)
  assert outcome(again) == {"reused": 3, "tokenized": 0, "failed": 0}
  assert {k: v for k, v in again.items() if k != "run"} == {k: v for k, v in first.items() if k != "run"}
  assert stamps == {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)}
  assert cli.run(["prepare", str(in_dir), "--output", out, "--text_field", "body"]) == 2
  assert "already holds a different corpus (its options differ)" in capsys.readouterr().err
  assert stamps == {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)}
  assert beam_temps() == []


def test_unfinished_output_reuses_verified_shards_and_rebuilds_a_corrupted_one(tmp_path, corpus):
  in_dir, _, _ = corpus
  out = str(tmp_path / "out")
  first = prepare.prepare([str(in_dir)], out)
  before = read_corpus(out)
  os.remove(os.path.join(out, records.MANIFEST))  # as a run killed before its last step leaves it
  shard = os.path.join(out, first["shards"][1]["path"])
  with open(shard, "r+b") as f:
    f.seek(40)
    byte = f.read(1)
    f.seek(40)
    f.write(bytes([byte[0] ^ 0xFF]))
  again = prepare.prepare([str(in_dir)], out)
  assert outcome(again) == {"reused": 2, "tokenized": 1, "failed": 0}
  assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]
  assert all(np.array_equal(a, b) for a, b in zip(before, read_corpus(out)))


def _write(path, data: bytes):
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


BAD_RECORDS = (b'{"text": "good one"}\n'
               b'{"text": "good two"\n'  # line 2: invalid JSON
               b'{"body": "no text field"}\n'  # line 3
               b'{"text": "caf\xe9"}\n'  # line 4: invalid UTF-8
               b'{"text": "good three"}\n')


def test_bad_records_fail_on_the_first_or_are_counted_by_reason(tmp_path, capsys):
  path = _write(tmp_path / "x.jsonl", BAD_RECORDS)
  out = tmp_path / "failed"
  assert cli.run(["prepare", path, "--output", str(out), "--direct_num_workers=1"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and f"{path}:2: not a JSON object" in err and "Fix:" in err
  assert not (out / records.MANIFEST).exists()
  assert cli.run(["prepare", path, "--output", str(tmp_path / "skipped"), "--on_bad_record", "skip",
                  "--direct_num_workers=1"]) == 0
  report = capsys.readouterr().out
  assert "bad records: 1 invalid json, 1 missing field, 1 invalid utf8" in report
  manifest = records.read_manifest(str(tmp_path / "skipped"))
  assert manifest["documents"] == 2
  assert {k: v for k, v in manifest["skipped"].items() if v} == {"invalid_json": 1, "missing_field": 1,
                                                                  "invalid_utf8": 1}


BAD_FILES = {
    "jsonl that is not JSON": (lambda d: _write(d / "x.jsonl", b"plain text, not json\n"), {},
                               "x.jsonl:1: not a JSON object"),
    "parquet that is not Parquet": (lambda d: _write(d / "x.parquet", b"hello"), {}, "not a Parquet file"),
    "invalid UTF-8": (lambda d: _write(d / "x.txt", b"caf\xe9 latin-1"), {}, "invalid UTF-8 at byte 3"),
    "absent JSON field": (lambda d: _write(d / "x.jsonl", b'{"body": "hi"}\n'), {}, "no field 'text'"),
    "absent Parquet column": (lambda d: pq.write_table(pa.table({"body": ["hi"]}), d / "x.parquet")
                              or str(d / "x.parquet"), {}, "no column 'text'"),
    "gzip that is not gzip": (lambda d: _write(d / "x.jsonl.gz", b'{"text": "hi"}\n'), {}, "cannot decompress"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_input_names_the_file_and_the_fix(tmp_path, case):
  make_input, options, message = BAD_FILES[case]
  with pytest.raises(readers.InputError) as e:
    prepare.prepare([make_input(tmp_path)], str(tmp_path / "out"), prepare.Options(**options))
  assert message in str(e.value) and "Fix:" in str(e.value)
  assert not os.path.exists(tmp_path / "out" / records.MANIFEST)


START_UP_ERRORS = {
    "unknown runner": (["--runner", "NoSuchRunner"], "--runner NoSuchRunner: Unexpected pipeline runner"),
    "unknown Beam flag": (["--direct_num_worker=2"], "--direct_num_worker is neither a flag of prepare"),
    "Dataflow without its options": (["--runner", "DataflowRunner"], "Missing required option: project"),
    "local paths for a cluster": (["--runner", "FlinkRunner"], "is on this machine, which the workers of --runner "
                                  "FlinkRunner cannot read"),
    "missing input glob": (["--inputs_instead", "nope/*.jsonl"], "nope/*.jsonl: no such file"),
    "missing input file": (["--inputs_instead", "nope.txt"], "nope.txt: no such file"),
    "unknown extension": (["--inputs_instead", "x.csv"], "x.csv: unknown extension"),
    "tokenizer file missing": (["--tokenizer", "/nope/tok.json"], "tokenizer file '/nope/tok.json' does not exist"),
    "tokenizer that is not one": (["--tokenizer", "x.csv"], "is not a HF tokenizers JSON file"),
    "validation fraction": (["--validation_fraction", "1.5"], "--validation_fraction 1.5 is outside [0, 1)"),
}


@pytest.mark.parametrize("case", sorted(START_UP_ERRORS))
def test_bad_flags_fail_at_start_up_in_one_line_and_write_nothing(tmp_path, corpus, capsys, monkeypatch, case,
                                                                  beam_temps):
  in_dir, _, _ = corpus
  monkeypatch.chdir(tmp_path)
  _write(tmp_path / "x.csv", b"a,b")
  flags, message = START_UP_ERRORS[case]
  inputs = [flags[1]] if flags[0] == "--inputs_instead" else [str(in_dir)]
  flags = [] if flags[0] == "--inputs_instead" else flags
  assert cli.run(["prepare", *inputs, "--output", str(tmp_path / "out"), *flags]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and message in err and "Fix:" in err, err
  assert not (tmp_path / "out").exists()
  assert beam_temps() == []


def test_without_beam_prepare_names_the_extra_in_one_line(tmp_path, corpus, capsys, monkeypatch):
  in_dir, _, _ = corpus
  imported = subprocess.run([sys.executable, "-c", "import sys, loopjax.cli.prepare, loopjax.data.prepare; "
                             "print('apache_beam' in sys.modules)"], capture_output=True, text=True, check=True)
  assert imported.stdout.strip() == "False"  # so that a missing extra is reported by prepare(), not an ImportError
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "apache_beam" else find_spec(name, *a))
  assert cli.run(["prepare", str(in_dir), "--output", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "Fix: pip install 'loopjax[beam]'" in err
  assert not (tmp_path / "out").exists()


def test_output_with_foreign_files_is_refused(tmp_path, corpus, capsys):
  in_dir, _, _ = corpus
  (tmp_path / "home").mkdir()
  (tmp_path / "home" / "notes.txt").write_text("mine")
  assert cli.run(["prepare", str(in_dir), "--output", str(tmp_path / "home")]) == 2
  assert "holds files prepare did not write ('notes.txt'" in capsys.readouterr().err
  assert os.listdir(tmp_path / "home") == ["notes.txt"]


def test_chunks_keep_every_target_once_and_spread_documents_over_batches(tmp_path):
  """Eight long documents, each one repeated character: whole, a batch's rows come from one or two of them;
  as chunks (shuffled apart by the loader) from many; the stream still resumes exactly."""
  from loopjax.data import make_train_iterator
  texts = [letter * 1000 for letter in "abcdefgh"]
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  for name, chunk_tokens in (("whole", 0), ("chunks", 64)):
    prepare.prepare([str(tmp_path / "docs.jsonl")], str(tmp_path / name), prepare.Options(chunk_tokens=chunk_tokens))
  chunks = read_corpus(tmp_path / "chunks")
  assert max(map(len, chunks)) == 65 and len(chunks) == 8 * 16
  for i, text in enumerate(texts):
    mine = chunks[i * 16:(i + 1) * 16]
    assert all(a[-1] == b[0] for a, b in zip(mine, mine[1:]))  # each chunk starts on its predecessor's last token
    targets = np.concatenate([c[1:] for c in mine])
    assert bytes(targets.astype(np.uint8)).decode() == text
  data_cfg = config.default_config().data
  data_cfg.num_shards = 1

  def batches(name, n=3):
    data_cfg.source = str(tmp_path / name)
    stream = make_train_iterator(data_cfg, seq_len=64, global_batch=8, seed=0)
    return stream, [next(stream) for _ in range(n)]

  def documents_per_batch(bs):  # a document's targets are its letter
    return [len(set(b["targets"][b["loss_mask"] > 0].tolist()) & set(b"abcdefgh")) for b in bs]

  _, whole = batches("whole")
  stream, mixed = batches("chunks")
  assert max(documents_per_batch(whole)) <= 2 and min(documents_per_batch(mixed)) >= 4
  state = stream.get_state()
  expected = next(stream)
  resumed, _ = batches("chunks", 0)
  resumed.set_state(state)
  for k, v in next(resumed).items():
    np.testing.assert_array_equal(v, expected[k])


def test_eval_source_defaults_to_the_validation_splits(tmp_path):
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(60)))
  for name, fraction in (("a", 0.3), ("b", 0.3), ("c", 0.0)):
    prepare.prepare([str(tmp_path / "docs.jsonl")], str(tmp_path / name),
                    prepare.Options(validation_fraction=fraction))
  cfg = config.default_config()
  a, b, c = (str(tmp_path / n) for n in "abc")
  for source, expected in ((a, f"{a}/validation"), (f"{a},{b}", f"{a}/validation,{b}/validation"),
                           (f"{a},{c}", f"{a},{c}"), ("mano", "mano")):
    cfg.data.source = source
    assert heldout.eval_source(cfg) == expected
  cfg.eval.source = c
  assert heldout.eval_source(cfg) == c
  assert records.read_manifest(f"{a}/validation")["documents"] == records.read_manifest(a)["validation"]["documents"]
  os.remove(os.path.join(a, records.MANIFEST))  # the corpus unfinished: its split is no corpus either
  with pytest.raises(records.CorpusError, match="held-out split of an unfinished corpus"):
    records.read_manifest(f"{a}/validation")


@pytest.mark.slow
def test_killed_run_leaves_no_corpus_and_a_rerun_equals_an_uninterrupted_run(tmp_path):
  inputs = []
  for i in range(4):  # big enough that the run is still going when the first file is committed
    path = tmp_path / f"in{i}.jsonl"
    line = json.dumps({"text": f"document {i} " + "word " * 60}) + "\n"
    path.write_text(line * 20_000)
    inputs.append(str(path))
  out = tmp_path / "out"
  proc = subprocess.Popen([sys.executable, "-m", "loopjax.cli", "prepare", *inputs, "--output", str(out),
                           "--validation_fraction", "0.01", "--chunk_tokens", "128",
                           *TWO_WORKERS], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env={**os.environ, "TMPDIR": str(tmp_path)},  # where its workers' log goes
                          start_new_session=True)  # its own process group: the launcher and its workers
  deadline = time.time() + 120
  committed = lambda: sorted(out.glob("*" + records.DONE_SUFFIX)) if out.exists() else []  # noqa: E731
  while not committed():
    assert proc.poll() is None and time.time() < deadline, "prepare ended before it could be killed"
    time.sleep(0.01)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (out / records.MANIFEST).exists()
  for sidecar in committed():  # what passes as a finished file holds the whole file
    summary = shard.finished(str(out), int(sidecar.name[len("shard-"):][:5]))
    assert summary["splits"]["train"]["documents"] + summary["splits"]["validation"]["documents"] == 20_000
  with pytest.raises(records.CorpusError, match="not a finished prepared corpus"):
    records.read_manifest(str(out))
  options = prepare.Options(validation_fraction=0.01, chunk_tokens=128)
  resumed = prepare.prepare(inputs, str(out), options)
  whole = prepare.prepare(inputs, str(tmp_path / "whole"), options)
  assert resumed["run"]["reused"] >= 1 and resumed["run"]["tokenized"] >= 1, resumed["run"]
  assert shard_hashes(out) == shard_hashes(tmp_path / "whole") and len(shard_hashes(out)) == 8
  assert resumed.pop("run") != whole.pop("run") and resumed == whole
  assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "whole"))
