"""Multi-hop QA and Capo generators checked from their own documents, and the exact-match evaluators."""

import numpy as np
import pytest

from loopjax import config
from loopjax.data import tasks
from loopjax.evaluation import exact_match

S = 3  # the shared specials <pad>, <bos>, <ans>


def cfg(source, **overrides):
  c = config.default_config().data
  c.source = source
  for k, v in overrides.items():
    c[k] = v
  return c


def multihop_parts(tokens, c):
  """(hops, person, relations, answer) read from a document by the layout in multihop's docstring."""
  t = [int(x) for x in tokens]
  rel0, person0 = S + c.multihop_max_hops, S + c.multihop_max_hops + c.multihop_relations
  assert t[0] == 1 and t[-2] == 2
  hops = t[1] - S + 1
  relations = [r - rel0 for r in t[3:-2]]
  assert len(relations) == hops and all(0 <= r < c.multihop_relations for r in relations)
  return hops, t[2] - person0, tuple(relations), t[-1] - person0


def test_multihop_answers_compose_the_facts_in_the_training_data():
  c = cfg("multihop", multihop_people=12, multihop_relations=3, multihop_max_hops=3)
  task = tasks.make_task("multihop", c)
  facts, questions = {}, []
  for i in range(3000):
    hops, person, path, answer = multihop_parts(task.train_example(0, i)["tokens"], c)
    if hops == 1:
      assert facts.setdefault((person, path[0]), answer) == answer, "contradicting facts"
    else:
      questions.append((person, path, answer))
  assert len(facts) == 12 * 3, "not every fact occurs in training"

  def follow(person, path):
    for r in path:
      person = facts[(person, r)]
    return person

  assert all(follow(p, path) == a for p, path, a in questions)
  evals = [multihop_parts(task.eval_example(0, i)["tokens"], c) for i in range(300)]
  assert all(h == 3 and follow(p, path) == a for h, p, path, a in evals)
  train_keys = {(p, path) for p, path, _ in questions}
  assert not train_keys & {(p, path) for _, p, path, _ in evals}, "an eval question is in training"


def test_multihop_train_questions_limits_distinct_questions():
  c = cfg("multihop", multihop_people=30, multihop_train_questions=7)
  task = tasks.make_task("multihop", c)
  docs = [multihop_parts(task.train_example(5, i)["tokens"], c) for i in range(800)]
  assert len({(p, path) for h, p, path, _ in docs if h > 1}) == 7


def test_capo_biographies_are_consistent_and_eval_asks_what_they_say():
  c = cfg("capo", capo_people=20, capo_attributes=3, capo_values=5)
  task = tasks.make_task("capo", c)
  attr0, value0 = S + 20, S + 20 + 3
  known, orders = {}, set()
  for i in range(500):
    doc = task.train_example(0, i)
    t = doc["tokens"].tolist()
    person, pairs = t[1] - S, list(zip(t[2::2], t[3::2]))
    assert len(pairs) == 3 and doc["answer_mask"].nonzero()[0].tolist() == [2, 4, 6]
    orders.add(tuple(a for a, _ in pairs))
    for a, v in pairs:
      a -= attr0
      assert value0 + a * 5 <= v < value0 + (a + 1) * 5, "value token outside its attribute's range"
      assert known.setdefault((person, a), v) == v, "two biographies disagree"
  assert len(orders) == 6, "attribute order is not shuffled"
  for i in range(200):
    t = task.eval_example(0, i)["tokens"].tolist()
    assert len(t) == 4 and t[3] == known[(t[1] - S, t[2] - attr0)]


@pytest.mark.parametrize("source", tasks.TASK_NAMES)
def test_exact_match_scores_per_question(source):
  batches = exact_match.make_eval_batches(cfg(source), seq_len=64, batch_size=4, num_batches=2)
  again = exact_match.make_eval_batches(cfg(source), seq_len=64, batch_size=4, num_batches=2)
  for b, b2 in zip(batches, again):
    np.testing.assert_array_equal(b["inputs"], b2["inputs"])
  batch = batches[0]
  assert exact_match.exact_match(batch["targets"], batch) == 1.0
  correct, total = exact_match.exact_match_counts(batch["targets"], batch)
  answers = np.argwhere(batch["answer_mask"] > 0)
  assert correct == total == len({(r, batch["segment_ids"][r, c]) for r, c in answers})
  # Break one answer token of one question: exactly that question turns wrong, whatever else is wrong.
  predicted = batch["targets"].copy()
  predicted[batch["answer_mask"] == 0] = -1
  r, col = np.argwhere(batch["answer_mask"] > 0)[0]
  predicted[r, col] += 1
  assert exact_match.exact_match_counts(predicted, batch) == (total - 1, total)


def test_eval_batches_need_a_synthetic_task():
  with pytest.raises(ValueError, match="one synthetic task"):
    exact_match.make_eval_batches(cfg("mano,capo"), seq_len=64, batch_size=4, num_batches=1)
