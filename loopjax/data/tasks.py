"""The built-in synthetic tasks by name: vocabulary size and the train / eval example functions.

Examples are module-level functions bound with functools.partial so grain can hand them to worker
processes. Train examples depend on the run's seed; a task's fixed "world" (people, relations, bios)
depends only on data.task_seed, so every run and the evaluation see the same knowledge.
"""

import dataclasses
import functools
from typing import Callable

from loopjax.data import mano

TASK_NAMES = ("mano", "multihop", "capo")


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  vocab_size: int
  train_example: Callable[[int, int], dict]  # (seed, index) -> document
  eval_example: Callable[[int, int], dict]  # (seed, index) -> document at the evaluated difficulty


def make_task(name: str, data_cfg) -> Task:
  if name == "mano":
    max_ops = int(data_cfg.mano_max_ops)
    return Task(name, mano.vocab_size(max_ops),
                functools.partial(mano.train_example, max_ops=max_ops),
                functools.partial(mano.eval_example, max_ops=max_ops))
  raise ValueError(f"unknown synthetic task {name!r}; built-in tasks are {TASK_NAMES}")

