"""The lm-eval tasks shipped in tasks/: held-out multi-hop QA as text, so their answers are known offline.

    multihop_mc       multiple choice: the question, the right person and 3 others that the same
                      person reaches by other paths (acc; chance 0.25; knowing which people are
                      frequent answers does not help, composing the facts does)
    multihop_rolling  rolling log-likelihood of the whole question and answer (perplexities, bits/byte)
    multihop_gen      generate until a space: the answer word (exact_match)

Each holds the same QUESTIONS held-out 3-hop questions of the default multi-hop world (data.task_seed,
multihop_people, multihop_relations, multihop_max_hops at their defaults: the smoke config's), written
in the task's words (`data/task_text.py`): `<hops_3> P12 r0 r3 r1 <ans>` -> `P40`. For a run on another
world, `write_task_files(directory, data_cfg)` writes its files; YAMLs of your own (`--include_path`) then
read them with `dataset_path: json` and absolute `data_files`.

lm-eval resolves a relative `data_files` against the working directory, so the YAMLs load their data
through `load_jsonl`, which finds the files beside the YAMLs from wherever lm-eval runs.
"""

import json
import os

import numpy as np

from loopjax.data import multihop, synthetic, tasks
from loopjax.data.task_text import TaskTokenizer

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
NAMES = ("multihop_mc", "multihop_rolling", "multihop_gen")
QUESTIONS = 200
CHOICES = 4
SEED = 0  # the held-out stream's seed (training never reads that stream)
_DISTRACTOR_STREAM = 4  # an example_rng stream of its own: the wrong choices and the right one's position


def load_jsonl(data_files: dict, **_):
  """`custom_dataset` of the shipped tasks: split -> JSONL file name in TASKS_DIR (lm-eval passes its
  metadata as keywords too)."""
  import datasets
  return datasets.load_dataset("json", data_files={split: os.path.join(TASKS_DIR, name)
                                                   for split, name in data_files.items()})


def _world(data_cfg) -> multihop.World:
  d = data_cfg
  return multihop.World(int(d.task_seed), int(d.multihop_people), int(d.multihop_relations), int(d.multihop_max_hops))


def _distractors(world: multihop.World, person: int, path: list[int], rng) -> list[int]:
  """CHOICES - 1 wrong people a model cannot rule out without composing the facts: the answers of the
  same person along other paths of the same length (then any other answer of that length, if too few)."""
  answer = world.answer(person, path)
  paths = np.stack(np.meshgrid(*[np.arange(world.relations)] * len(path), indexing="ij"), -1).reshape(-1, len(path))
  same_person = sorted({world.answer(person, p) for p in paths.tolist()} - {answer})
  picked = [same_person[i] for i in rng.permutation(len(same_person))[:CHOICES - 1]]
  if len(picked) < CHOICES - 1:
    rest = sorted({world.answer(a, p) for a in range(world.people) for p in paths.tolist()} - {answer, *picked})
    picked += [rest[i] for i in rng.permutation(len(rest))[:CHOICES - 1 - len(picked)]]
  return picked


def documents(data_cfg) -> dict[str, list[dict]]:
  """Task name -> its documents (one JSON object each): the first QUESTIONS held-out questions."""
  task, world = tasks.make_task("multihop", data_cfg), _world(data_cfg)
  words = TaskTokenizer(task)
  mc, rolling, gen = [], [], []
  for i in range(QUESTIONS):
    tokens = task.eval_example(SEED, i)["tokens"].tolist()  # <bos> <hops_k> P r_1 .. r_k <ans> answer
    question, answer = words.decode(tokens[1:-1]), words.decode(tokens[-1:])
    person, path = tokens[2] - world.person_base, [t - world.relation_base for t in tokens[3:-2]]
    rng = synthetic.example_rng(SEED, _DISTRACTOR_STREAM, i)
    choices = [words.decode([world.person_base + p]) for p in _distractors(world, person, path, rng)]
    right = int(rng.integers(CHOICES))
    choices.insert(right, answer)
    mc.append({"question": question, "choices": choices, "answer": right})
    rolling.append({"text": f"{question} {answer}"})
    gen.append({"question": question, "answer": answer})
  return dict(zip(NAMES, (mc, rolling, gen)))


def write_task_files(directory: str = TASKS_DIR, data_cfg=None):
  """Writes <task>.jsonl for every task of NAMES (the default world unless `data_cfg` says otherwise)."""
  from loopjax.config import default_config
  for name, docs in documents(data_cfg or default_config().data).items():
    with open(os.path.join(directory, f"{name}.jsonl"), "w") as f:
      f.writelines(json.dumps(d) + "\n" for d in docs)

