"""The commands that read or write a run after training, on gs:// (fake-gcs-server, see test_gcs.py).

One tiny run is trained into the bucket per module; eval, generate, upscale and export-hf then read it
there, and what they read is compared with the same command on a local copy of the checkpoints,
byte for byte or number for number. Prepared corpora are read from the bucket by ArrayRecord itself.
"""

import json
import math
import os

import jax
import numpy as np
import pytest
from etils import epath

import _train_subprocess as ts
from test_gcs import _bucket_run, _train, gcs  # noqa: F401 - gcs is a fixture

from loopjax import checkpoint as ck
from loopjax import storage
from loopjax.checkpoint.listing import list_checkpoints
from loopjax.cli import run as cli


@pytest.fixture(scope="module")
def trained(gcs, tmp_path_factory):  # noqa: F811
  """(gs:// workdir, local copy of its checkpoints) of one tiny run trained into the bucket."""
  run = _bucket_run("tools")
  cwd = tmp_path_factory.mktemp("cwd")
  result = _train(run, cwd, gcs)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.listdir(cwd) == []
  local = tmp_path_factory.mktemp("local") / "checkpoints"
  storage.copy_tree(f"{run}/checkpoints", local)
  return run, str(local)


def _last_json_line(path) -> dict:
  return json.loads(epath.Path(path).read_text().splitlines()[-1])


def test_eval_reads_the_bucket_and_appends_there(trained, tmp_path):
  run, local = trained
  for _ in range(2):  # the second appends to the object the first wrote
    assert cli(["eval", "--checkpoint", run, "--loop_steps", "1,4", "--output", f"{run}/eval.jsonl"]) == 0
  assert cli(["eval", "--checkpoint", local, "--loop_steps", "1,4", "--output", str(tmp_path / "eval.jsonl")]) == 0
  lines = epath.Path(f"{run}/eval.jsonl").read_text().splitlines()
  assert len(lines) == 2 and lines[0] == lines[1]
  assert json.loads(lines[0]) == _last_json_line(tmp_path / "eval.jsonl")
  assert json.loads(lines[0])["step"] == ts.STEPS and math.isfinite(json.loads(lines[0])["eval_T4/loss"])


def test_generate_reads_the_bucket(trained, tmp_path):
  run, local = trained
  prompts, outputs = tmp_path / "prompts.jsonl", []
  prompts.write_text('{"ids": [1, 2, 3]}\n')
  for source in (run, local):
    out = tmp_path / f"out{len(outputs)}.jsonl"
    assert cli(["generate", "--checkpoint", source, "--prompts_file", str(prompts), "--max_new_tokens", "4",
                "--exit_threshold", "0.5", "--output", str(out)]) == 0
    outputs.append(out.read_text())
  assert outputs[0] == outputs[1] and len(json.loads(outputs[0])["generated_ids"]) == 4


def _files(root) -> dict[str, bytes]:
  root = epath.Path(root)
  return {rel: (root / rel).read_bytes() for rel in storage.files_under(root)}


def test_upscale_bucket_to_bucket_is_a_finished_checkpoint(trained, tmp_path):
  run, local = trained
  target = _bucket_run("upscaled") + "/checkpoints"
  assert cli(["upscale", "--from", f"{run}/checkpoints", "--to", target, "--layers", "4"]) == 0
  assert cli(["upscale", "--from", local, "--to", str(tmp_path / "up"), "--layers", "4"]) == 0
  rows = list_checkpoints(target)
  assert [(r["step"], r["complete"]) for r in rows] == [(ts.STEPS, True)], rows
  on_bucket, on_disk = ck.restore_params(target), ck.restore_params(str(tmp_path / "up"))  # checksums verified
  assert on_bucket.meta["config"]["model"]["num_layers"] == 4
  jax.tree.map(np.testing.assert_array_equal, on_bucket.items["params"], on_disk.items["params"])


def test_export_hf_from_and_to_the_bucket(trained, tmp_path):
  run, local = trained
  output = _bucket_run("hf")
  assert cli(["export-hf", "--checkpoint", run, "--output", output, "--dtype", "float32"]) == 0
  assert cli(["export-hf", "--checkpoint", local, "--output", str(tmp_path / "hf"), "--dtype", "float32"]) == 0
  exported, reference = _files(output), _files(tmp_path / "hf")
  differ = [name for name in reference if exported.get(name) != reference[name]]
  assert set(exported) == set(reference) and "config.json" in exported
  assert differ in ([], ["README.md"]), differ  # the model card names its source checkpoint
  assert cli(["export-hf", "--checkpoint", run, "--output", output]) == 2  # not empty, no --overwrite


def test_prepared_corpus_on_the_bucket_reads_like_the_local_one(gcs, tmp_path):  # noqa: F811
  from helpers import tiny_config
  from loopjax.data import data_vocab_size, prepare, records
  from test_data_prepare import write_corpus
  write_corpus(tmp_path / "in", num_docs=10)
  corpus = tmp_path / "corpus"
  prepare.prepare([str(tmp_path / "in")], str(corpus), prepare.Options(tokenizer="byte"))
  remote = _bucket_run("corpus")
  storage.copy_tree(corpus, remote)
  assert records.read_manifest(remote) == records.read_manifest(str(corpus))
  on_bucket, on_disk = records.corpus_documents(remote), records.corpus_documents(str(corpus))
  assert len(on_bucket) == len(on_disk) > 0
  for i in range(len(on_disk)):
    np.testing.assert_array_equal(on_bucket[i]["tokens"], on_disk[i]["tokens"])
  cfg = tiny_config()
  cfg.data.source = remote
  assert data_vocab_size(cfg.data) == records.read_manifest(str(corpus))["tokenizer"]["vocab_size"]


def test_export_finds_the_tokenizer_beside_a_corpus_on_the_bucket(gcs, tmp_path):  # noqa: F811
  """export-hf's card reads a gs:// corpus like a local one: its tokenizer is found (sha256 checked), its
  special ids read, and it is shipped byte for byte."""
  from helpers import tiny_config
  from test_hf_interop import _chat_tokenizer
  from loopjax.data import prepare
  from loopjax.hf import card
  tokenizer = _chat_tokenizer(tmp_path / "tokenizer.json")
  (tmp_path / "docs.jsonl").write_text('{"text": "a b a"}\n{"text": "b b"}\n')
  corpus = tmp_path / "corpus"
  prepare.prepare([str(tmp_path / "docs.jsonl")], str(corpus), prepare.Options(tokenizer=tokenizer))
  remote = _bucket_run("tokenized-corpus")
  storage.copy_tree(corpus, remote)
  cfg = tiny_config()
  cfg.data.source = remote
  found = card.find_tokenizer(cfg, None)
  assert found == f"{remote}/tokenizer.json"
  ids = card.special_ids(cfg, found)
  assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == (1, 2, 0)
  card.copy_tokenizer(found, str(tmp_path / "out"))
  assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
  epath.Path(remote, "tokenizer.json").write_text("{}")  # no longer the manifest's tokenizer: not shipped
  assert card.find_tokenizer(cfg, None) is None


@pytest.mark.parametrize("source", ["gs://bucket/no-such-corpus", "s3://bucket/corpus"])
def test_unusable_corpus_url_fails_at_startup(gcs, tmp_path, source):  # noqa: F811
  result = _train(str(tmp_path / "run"), tmp_path, gcs, extra=[f"--config.data.source={source}"])
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("loopjax train:")]
  assert len(errors) == 1 and "config.data.source" in errors[0] and "Fix:" in errors[0], result.stderr[-2000:]
  assert "compiled" not in result.stderr
