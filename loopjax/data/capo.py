"""Capo-style knowledge storage probe (SPEC section 6): synthetic biographies to be memorised.

The world (fixed by data.task_seed): N people, each with A attributes drawn from V values. A training
document is one person's biography, `<bos> P_p <attr_a> v_a <attr_b> v_b ...`, attributes in a fresh
random order each time (so every attribute is learned after every prefix, as with Capo's templates).
Evaluation asks `<bos> P_p <attr_a>` and scores the value: a one-attribute biography, in distribution.
Capacity = people * attributes * log2(values) bits when all are right; looping should not change it.

Vocabulary: shared specials, the people, the attributes, then V value tokens per attribute.
"""

import numpy as np

from loopjax.data import synthetic


class World:
  def __init__(self, task_seed: int, people: int, attributes: int, values: int):
    self.people, self.attributes, self.values = people, attributes, values
    rng = synthetic.example_rng(task_seed, synthetic.WORLD_STREAM, 0)
    self.value_pa = rng.integers(values, size=(people, attributes))
    self.person_base = synthetic.NUM_SPECIALS
    self.attribute_base = self.person_base + people
    self.value_base = self.attribute_base + attributes
    self.vocab_size = self.value_base + attributes * values

  def token_names(self) -> list[str]:
    """A word per token id (`task_text.TaskTokenizer`): people P<i>, attributes <attr_a>, values a<a>=<v>."""
    return ([*synthetic.SPECIAL_NAMES] + [f"P{p}" for p in range(self.people)]
            + [f"<attr_{a}>" for a in range(self.attributes)]
            + [f"a{a}={v}" for a in range(self.attributes) for v in range(self.values)])

  def document(self, person: int, attributes) -> dict:
    tokens = [synthetic.BOS, self.person_base + person]
    answers = []
    for a in attributes:
      tokens += [self.attribute_base + a, self.value_base + a * self.values + int(self.value_pa[person, a])]
      answers.append(len(tokens) - 1)
    return synthetic.document(tokens, answers)


def train_example(seed: int, index: int, world: World) -> dict:
  rng = synthetic.example_rng(seed, synthetic.TRAIN_STREAM, index)
  return world.document(int(rng.integers(world.people)), rng.permutation(world.attributes).tolist())


def eval_example(seed: int, index: int, world: World) -> dict:
  rng = synthetic.example_rng(seed, synthetic.EVAL_STREAM, index)
  return world.document(int(rng.integers(world.people)), [int(rng.integers(world.attributes))])
