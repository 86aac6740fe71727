"""Mano: knowledge manipulation probe (SPEC section 6), prefix expressions over {+,-,*} mod 23.

A document is `<bos> <len_l> e_1 ... e_{2l+1} <ans> answer`: a prefix-notation expression with l
binary operations, then the value as one token, with no intermediate steps; the model must evaluate the
whole tree "in its head", which is what looping is claimed to help. Training draws l uniformly from
[1, max_ops]; evaluation uses l = max_ops only.

Vocabulary: the shared specials (pad, bos, ans), then the 3 operators, the numbers 0..22, and one
length token per l in 1..max_ops.
"""

import numpy as np

from loopjax.data import synthetic

MODULUS = 23
OPERATORS = ("+", "-", "*")
OP_BASE = synthetic.NUM_SPECIALS
NUM_BASE = OP_BASE + len(OPERATORS)
LEN_BASE = NUM_BASE + MODULUS  # token of length l is LEN_BASE + l - 1


def vocab_size(max_ops: int) -> int:
  return LEN_BASE + max_ops


def _apply(op: int, a: int, b: int) -> int:
  if op == 0:
    return (a + b) % MODULUS
  if op == 1:
    return (a - b) % MODULUS
  return (a * b) % MODULUS


def _expression(rng: np.random.Generator, num_ops: int, out: list) -> int:
  """Appends a random prefix expression with `num_ops` operations to `out`; returns its value.

  The left subtree gets a uniform share of the operations, so all tree shapes occur.
  """
  if num_ops == 0:
    value = int(rng.integers(MODULUS))
    out.append(NUM_BASE + value)
    return value
  op = int(rng.integers(len(OPERATORS)))
  out.append(OP_BASE + op)
  left_ops = int(rng.integers(num_ops))
  left = _expression(rng, left_ops, out)
  right = _expression(rng, num_ops - 1 - left_ops, out)
  return _apply(op, left, right)


def example(rng: np.random.Generator, num_ops: int) -> dict:
  """One Mano document with exactly `num_ops` operations (see `synthetic.document`)."""
  tokens = [synthetic.BOS, LEN_BASE + num_ops - 1]
  value = _expression(rng, num_ops, tokens)
  tokens += [synthetic.ANS, NUM_BASE + value]
  return synthetic.document(tokens, [len(tokens) - 1])


def train_example(seed: int, index: int, max_ops: int) -> dict:
  rng = synthetic.example_rng(seed, synthetic.TRAIN_STREAM, index)
  return example(rng, int(rng.integers(1, max_ops + 1)))


def eval_example(seed: int, index: int, max_ops: int) -> dict:
  return example(synthetic.example_rng(seed, synthetic.EVAL_STREAM, index), max_ops)


def detokenize(tokens) -> list[str]:
  """Human-readable tokens: for debugging, docs and the task's text form (`task_text.TaskTokenizer`)."""
  names = dict(enumerate(synthetic.SPECIAL_NAMES))
  out = []
  for t in np.asarray(tokens).tolist():
    if t in names:
      out.append(names[t])
    elif t < NUM_BASE:
      out.append(OPERATORS[t - OP_BASE])
    elif t < LEN_BASE:
      out.append(str(t - NUM_BASE))
    else:
      out.append(f"<len_{t - LEN_BASE + 1}>")
  return out
