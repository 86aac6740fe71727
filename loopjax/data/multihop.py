"""Multi-hop QA probe (SPEC section 6): synthetic people and relations, k-hop questions, one-token answers.

The world (fixed by data.task_seed): N people and R relations, each relation a random function
person -> person. A document is `<bos> <hops_k> P_a r_1 ... r_k <ans> P_z` with P_z = r_k(...r_1(P_a)).
One-hop documents are the facts; all of them are training data. Multi-hop questions are split by a
hash of (k, person, relations) into training (4/5) and held out (1/5); evaluation asks held-out
questions at k = max_hops, so a correct answer means composing stored facts, not recalling the question.
`train_questions` > 0 limits training to that many distinct multi-hop questions (the paper's
sample-efficiency axis).

Vocabulary: shared specials, one hop-count token per k, the relations, the people.
"""

import zlib

import numpy as np

from loopjax.data import synthetic

HELD_OUT_ONE_IN = 5
_QUESTION_STREAM = 3


class World:
  """The fixed relation tables and token layout of one (task_seed, people, relations, max_hops)."""

  def __init__(self, task_seed: int, people: int, relations: int, max_hops: int):
    self.task_seed, self.people, self.relations, self.max_hops = task_seed, people, relations, max_hops
    rng = synthetic.example_rng(task_seed, synthetic.WORLD_STREAM, 0)
    self.table_rp = rng.integers(people, size=(relations, people))  # table[r, a] = r(a)
    self.hop_base = synthetic.NUM_SPECIALS
    self.relation_base = self.hop_base + max_hops
    self.person_base = self.relation_base + relations
    self.vocab_size = self.person_base + people

  def token_names(self) -> list[str]:
    """A word per token id (`task_text.TaskTokenizer`): hop counts, relations r<i>, people P<i>."""
    return ([*synthetic.SPECIAL_NAMES] + [f"<hops_{k}>" for k in range(1, self.max_hops + 1)]
            + [f"r{r}" for r in range(self.relations)] + [f"P{p}" for p in range(self.people)])

  def answer(self, person: int, path) -> int:
    for r in path:
      person = int(self.table_rp[r, person])
    return person

  def held_out(self, person: int, path) -> bool:
    key = np.array([self.task_seed, len(path), person, *path], np.int64).tobytes()
    return len(path) > 1 and zlib.crc32(key) % HELD_OUT_ONE_IN == 0

  def document(self, person: int, path) -> dict:
    tokens = [synthetic.BOS, self.hop_base + len(path) - 1, self.person_base + person]
    tokens += [self.relation_base + r for r in path]
    tokens += [synthetic.ANS, self.person_base + self.answer(person, path)]
    return synthetic.document(tokens, [len(tokens) - 1])

  def sample(self, rng: np.random.Generator, hops: int, held_out: bool) -> tuple[int, list[int]]:
    """A uniform question with `hops` hops from the training split or the held-out split."""
    while True:
      person = int(rng.integers(self.people))
      path = rng.integers(self.relations, size=hops).tolist()
      if hops == 1 or self.held_out(person, path) == held_out:
        return person, path


def train_example(seed: int, index: int, world: World, train_questions: int) -> dict:
  """k uniform in [1, max_hops]; k = 1 is a fact, k > 1 a training-split question."""
  rng = synthetic.example_rng(seed, synthetic.TRAIN_STREAM, index)
  hops = int(rng.integers(1, world.max_hops + 1))
  if hops > 1 and train_questions > 0:
    # The j-th distinct question does not depend on the run's seed, only on the world.
    question = int(rng.integers(train_questions))
    rng = synthetic.example_rng(world.task_seed, _QUESTION_STREAM, question)
    hops = int(rng.integers(2, world.max_hops + 1))
  return world.document(*world.sample(rng, hops, held_out=False))


def eval_example(seed: int, index: int, world: World) -> dict:
  rng = synthetic.example_rng(seed, synthetic.EVAL_STREAM, index)
  return world.document(*world.sample(rng, world.max_hops, held_out=True))
