"""Mano generator and the default (no-file) training stream, checked against an evaluator written here."""

import numpy as np
import pytest

from loopjax import config
from loopjax.data import data_vocab_size, make_train_iterator, mano

# The test's own reading of the vocabulary in SPEC section 6: <bos>=1, <ans>=2, ops "+-*" = 3..5,
# numbers 0..22 = 6..28, <len_l> = 28 + l.
BOS, ANS, OPS, NUMBERS, LEN0 = 1, 2, {3: "+", 4: "-", 5: "*"}, range(6, 29), 28


def evaluate_prefix(tokens) -> tuple[int, int]:
  """(value mod 23, number of operations) of a prefix expression, by a right-to-left operand stack."""
  stack, num_ops = [], 0
  for t in reversed(list(tokens)):
    if t in OPS:
      a, b = stack.pop(), stack.pop()
      stack.append({"+": a + b, "-": a - b, "*": a * b}[OPS[t]] % 23)
      num_ops += 1
    else:
      assert t in NUMBERS, f"token {t} is neither operator nor number"
      stack.append(t - 6)
  assert len(stack) == 1, "not a single well-formed expression"
  return stack[0], num_ops


def check_document(tokens) -> int:
  """Asserts a Mano document is well formed and its answer right; returns its number of operations."""
  tokens = list(tokens)
  assert tokens[0] == BOS and tokens[-2] == ANS
  value, num_ops = evaluate_prefix(tokens[2:-2])
  assert tokens[1] == LEN0 + num_ops, "length token disagrees with the expression"
  assert tokens[-1] == 6 + value, "wrong answer"
  return num_ops


def test_train_examples_are_correct_and_cover_all_lengths():
  lengths = [check_document(mano.train_example(3, i, max_ops=5)["tokens"]) for i in range(600)]
  assert set(lengths) == {1, 2, 3, 4, 5}
  counts = np.bincount(lengths)[1:]
  assert counts.min() > 80, f"l is not close to uniform: {counts}"


def test_eval_examples_use_max_ops_and_differ_from_train():
  evals = [mano.eval_example(3, i, max_ops=7) for i in range(200)]
  assert all(check_document(e["tokens"]) == 7 for e in evals)
  trains = {tuple(mano.train_example(3, i, max_ops=7)["tokens"]) for i in range(200)}
  assert not trains & {tuple(e["tokens"]) for e in evals}


def test_answer_mask_marks_only_the_answer_target():
  doc = mano.train_example(0, 11, max_ops=4)
  assert doc["answer_mask"].shape == (len(doc["tokens"]) - 1,)
  assert doc["answer_mask"].tolist() == [0.0] * (len(doc["tokens"]) - 2) + [1.0]


def test_vocab_size_covers_every_token():
  c = config.default_config()
  c.data.mano_max_ops = 9
  assert data_vocab_size(c.data) == LEN0 + 9 + 1
  top = max(int(mano.train_example(0, i, max_ops=9)["tokens"].max()) for i in range(300))
  assert top < data_vocab_size(c.data)


def _batches(n, seed=0, **overrides):
  c = config.default_config()
  for k, v in overrides.items():
    c.data[k] = v
  it = make_train_iterator(c.data, seq_len=64, global_batch=4, seed=seed)
  return [next(it) for _ in range(n)]


def documents_in_batch(batch):
  """Yields (inputs, targets, loss_mask, positions) per document of each packed row."""
  for row in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][row]
    for s in np.unique(seg[seg > 0]):
      sel = seg == s
      yield (batch["inputs"][row][sel], batch["targets"][row][sel], batch["loss_mask"][row][sel],
             batch["positions"][row][sel])


@pytest.mark.parametrize("loss_on", ["answer", "all"])
def test_default_stream_is_packed_mano_with_the_batch_contract(loss_on):
  for batch in _batches(3, loss_on=loss_on):
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "inputs": ((4, 64), "int32"), "targets": ((4, 64), "int32"), "loss_mask": ((4, 64), "float32"),
        "segment_ids": ((4, 64), "int32"), "positions": ((4, 64), "int32")}
    pad = batch["segment_ids"] == 0
    assert (batch["loss_mask"][pad] == 0).all()
    for inputs, targets, loss_mask, positions in documents_in_batch(batch):
      assert positions.tolist() == list(range(len(inputs)))
      assert (inputs[1:] == targets[:-1]).all(), "targets are not the next tokens of the document"
      check_document(np.append(inputs, targets[-1]))
      expected = [0.0] * (len(targets) - 1) + [1.0] if loss_on == "answer" else [1.0] * len(targets)
      assert loss_mask.tolist() == expected


def test_stream_is_deterministic_per_seed():
  a, b, c = _batches(2, seed=5), _batches(2, seed=5), _batches(2, seed=6)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
