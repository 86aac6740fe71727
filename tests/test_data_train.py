"""prepare -> train -> eval: corpora written here, tokenized to ArrayRecord, trained on by the real loop,
evaluated on their held-out split."""

import json
import math
import os

import pytest

from helpers import tiny_config
from loopjax import cli
from loopjax.data import data_vocab_size, prepare
from loopjax.evaluation import teacher_forced
from loopjax.train.driver import train
from test_data_prepare import train_bpe, write_corpus


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_prepare_then_train(tmp_path, kind):
  docs, _ = write_corpus(tmp_path / "in", num_docs=40)
  tokenizer = "byte" if kind == "byte" else train_bpe(tmp_path / "tokenizer.json", docs)
  corpus = str(tmp_path / "corpus")
  prepare.prepare([str(tmp_path / "in")], corpus, prepare.Options(tokenizer=tokenizer, validation_fraction=0.2))

  cfg = tiny_config()
  cfg.data.source = corpus
  cfg.model.vocab_size = 8 * math.ceil(data_vocab_size(cfg.data) / 8)  # divisible by any test mesh
  cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len, cfg.train.log_every = 20, 8, 64, 5
  cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.decay_steps = 3e-3, 3, 3
  train(cfg, str(tmp_path / "run"))

  with open(tmp_path / "run" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert rows[0]["tokens"] > 0.9 * cfg.train.batch_size * cfg.train.seq_len * 0.5  # real text, not padding
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
  assert rows[0]["loss"] < math.log(cfg.model.vocab_size) + 1.0
  _eval_reads_the_validation_split(cfg, corpus, str(tmp_path / "run"), tmp_path)


def _eval_reads_the_validation_split(cfg, corpus: str, run: str, tmp_path):
  """`loopjax eval` of a run trained on a corpus prepared with --validation_fraction scores the held-out
  documents, not the first training batches, unless told otherwise."""
  held_out, training = (teacher_forced.eval_batches(cfg) for cfg.eval.source in (f"{corpus}/validation", corpus))
  cfg.eval.source = ""
  default = teacher_forced.eval_batches(cfg)
  assert all((a["inputs"] == b["inputs"]).all() for a, b in zip(default, held_out))
  assert not all((a["inputs"] == b["inputs"]).all() for a, b in zip(default, training))
  for name, data in (("default", []), ("held_out", ["--data", f"{corpus}/validation"])):
    assert cli.run(["eval", "--checkpoint", run, *data, "--output", str(tmp_path / name)]) == 0
  assert (tmp_path / "default").read_text() == (tmp_path / "held_out").read_text()

