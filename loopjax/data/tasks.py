"""The built-in synthetic tasks by name: vocabulary size and the train / eval example functions.

Examples are module-level functions bound with functools.partial so grain can hand them to worker
processes. Train examples depend on the run's seed; a task's fixed "world" (people, relations, bios)
depends only on data.task_seed, so every run and its evaluation see the same knowledge.
"""

import dataclasses
import functools
from typing import Callable

from loopjax.data import capo, mano, multihop

TASK_NAMES = ("mano", "multihop", "capo")


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  vocab_size: int
  train_example: Callable[[int, int], dict]  # (seed, index) -> document
  eval_example: Callable[[int, int], dict]  # (seed, index) -> document at the evaluated difficulty
  token_names: tuple[str, ...]  # a distinct word per token id: the task's text form (`task_text`)


def make_task(name: str, data_cfg) -> Task:
  d = data_cfg
  if name == "mano":
    max_ops = int(d.mano_max_ops)
    return Task(name, mano.vocab_size(max_ops), functools.partial(mano.train_example, max_ops=max_ops),
                functools.partial(mano.eval_example, max_ops=max_ops),
                tuple(mano.detokenize(range(mano.vocab_size(max_ops)))))
  if name == "multihop":
    world = multihop.World(int(d.task_seed), int(d.multihop_people), int(d.multihop_relations),
                           int(d.multihop_max_hops))
    return Task(name, world.vocab_size,
                functools.partial(multihop.train_example, world=world,
                                  train_questions=int(d.multihop_train_questions)),
                functools.partial(multihop.eval_example, world=world), tuple(world.token_names()))
  if name == "capo":
    world = capo.World(int(d.task_seed), int(d.capo_people), int(d.capo_attributes), int(d.capo_values))
    return Task(name, world.vocab_size, functools.partial(capo.train_example, world=world),
                functools.partial(capo.eval_example, world=world), tuple(world.token_names()))
  raise ValueError(f"unknown synthetic task {name!r}; built-in tasks are {TASK_NAMES}")
