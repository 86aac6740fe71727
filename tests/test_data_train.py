"""prepare -> train: corpora written here, tokenized to ArrayRecord, trained on by the real loop."""

import json
import math
import os

import pytest

from helpers import tiny_config
from loopjax.data import data_vocab_size, prepare
from loopjax.train.driver import train
from test_data_prepare import train_bpe, write_corpus


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_prepare_then_train(tmp_path, kind):
  docs, _ = write_corpus(tmp_path / "in", num_docs=40)
  tokenizer = "byte" if kind == "byte" else train_bpe(tmp_path / "tokenizer.json", docs)
  corpus = str(tmp_path / "corpus")
  prepare.prepare([str(tmp_path / "in")], corpus, prepare.Options(tokenizer=tokenizer), progress=False)

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
