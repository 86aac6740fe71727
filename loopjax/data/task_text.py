"""A synthetic task as text: one word per token id, so text-based tools can talk to a task-trained run.

The synthetic tasks have no text, only token ids. lm-evaluation-harness (and `loopjax generate
--prompt`) speak text, so a run trained on a task gets this tokenizer as its own: token id i is the
task's word `token_names[i]` (`<bos>`, `<hops_3>`, `r2`, `P17`, ...), and text is words separated by
whitespace. Encoding is exact both ways (decode(encode(t)) is t with single spaces), and a
context/continuation pair splits at a word boundary, as lm-eval expects.
"""

import numpy as np

from loopjax.data import synthetic
from loopjax.data.tokenizer import TokenizerError


class TaskTokenizer:
  """Word-level tokenizer of one synthetic task; the document-start id is the tasks' shared BOS."""

  bos_id = synthetic.BOS

  def __init__(self, task):
    self.name, self.names = task.name, task.token_names
    self.vocab_size = len(self.names)
    self._ids = {word: i for i, word in enumerate(self.names)}

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray([self._id(word) for word in text.split()], np.uint32) for text in texts]

  def _id(self, word: str) -> int:
    if word not in self._ids:
      raise TokenizerError(f"{word!r} is not a word of the {self.name} task's text form (words like "
                           f"{' '.join(self.names[1:6])} ...). Fix: write the text in the task's words, "
                           "or give the run's real tokenizer")
    return self._ids[word]

  def decode(self, ids: list[int]) -> str:
    """The words of `ids`; an id past the task's words (a model's vocabulary is often larger) is <id_N>."""
    return " ".join(self.names[i] if i < self.vocab_size else f"<id_{i}>" for i in ids)
