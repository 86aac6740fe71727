"""What every built-in synthetic task shares: special token ids, per-example seeding, the document form.

A synthetic task is random-access: example `i` of a stream is a pure function of (task seed, stream,
index), so the tasks are unbounded, identical on every host and every restart, and need no files or
iterator state beyond grain's index. Each example is a document of token ids plus a mask saying which
of its next-token targets are the answer (what the exact-match evaluators score).
"""

import numpy as np

PAD = 0  # padding; never a target (segment id 0)
BOS = 1  # document start
ANS = 2  # "the answer follows"
NUM_SPECIALS = 3
SPECIAL_NAMES = ("<pad>", "<bos>", "<ans>")  # the specials' words in a task's text form (`task_text`)

# Stream ids keep train and eval examples (and a task's fixed "world") from sharing random numbers.
TRAIN_STREAM = 0
EVAL_STREAM = 1
WORLD_STREAM = 2


def example_rng(seed: int, stream: int, index: int) -> np.random.Generator:
  """The generator for example `index` of `stream`; independent of every other (seed, stream, index)."""
  return np.random.default_rng([seed, stream, index])


def document(tokens, answer_indices) -> dict:
  """A document whose tokens at `answer_indices` (indices into tokens, all >= 1) are answers.

  Returns {"tokens": int32[n], "answer_mask": float32[n-1]}: answer_mask[j] is 1 where target j
  (= tokens[j+1]) is an answer token.
  """
  tokens_n = np.asarray(tokens, dtype=np.int32)
  answer_mask = np.zeros(len(tokens_n) - 1, np.float32)
  answer_mask[np.asarray(answer_indices) - 1] = 1.0
  return {"tokens": tokens_n, "answer_mask": answer_mask}
