"""Held-out batches of the synthetic tasks and the exact-match score of a model's predictions on them.

Evaluation batches are packed like training batches (so the model sees the same layout) and carry one
extra key, `answer_mask` float32 [batch, seq_len], marking targets that are answer tokens. A question
counts as right only if every one of its answer tokens is predicted exactly; chance is about 1/23 on
Mano. The scorers are pure numpy functions of (predicted ids, batch), usable per loop step.
"""

import itertools
import sys

import grain
import numpy as np

from loopjax.data import packing, pipeline, tasks


def make_eval_batches(data_cfg, *, seq_len: int, batch_size: int, num_batches: int,
                      seed: int = 0) -> list[dict]:
  """`num_batches` fixed held-out batches of the configured synthetic task (at its eval difficulty).

  The same (data_cfg, seed) gives the same batches in every run and on every host.
  """
  names = pipeline.source_names(data_cfg)
  if len(names) != 1 or names[0] not in tasks.TASK_NAMES:
    raise ValueError(f"exact-match evaluation needs one synthetic task as data.source, got {names}; "
                     f"use one of {tasks.TASK_NAMES}")
  task = tasks.make_task(names[0], data_cfg)
  loss_on = data_cfg.loss_on
  examples = (grain.MapDataset.range(sys.maxsize)
              .map(lambda i: task.eval_example(seed, i))
              .map(lambda doc: packing.lm_example(doc, loss_on=loss_on, keep_answer_mask=True))
              .to_iter_dataset(grain.ReadOptions(num_threads=0)))
  rows = packing.pack(examples, seq_len=seq_len, mode="document", num_bins=batch_size, seed=seed,
                      with_answer_mask=True)
  return list(itertools.islice(iter(rows.batch(batch_size, drop_remainder=True)), num_batches))


def exact_match_counts(predicted_ids: np.ndarray, batch: dict) -> tuple[int, int]:
  """(questions answered exactly, questions) in a batch; predicted_ids [batch, seq_len] predicts targets."""
  answer = np.asarray(batch["answer_mask"]) > 0
  wrong = (np.asarray(predicted_ids) != batch["targets"]) & answer
  rows = np.broadcast_to(np.arange(answer.shape[0])[:, None], answer.shape)
  # One id per (row, segment): a question is a document in a packed row.
  question = rows[answer] * (int(batch["segment_ids"].max()) + 1) + batch["segment_ids"][answer]
  ids, inverse = np.unique(question, return_inverse=True)
  wrong_per_question = np.bincount(inverse, weights=wrong[answer], minlength=len(ids))
  return int((wrong_per_question == 0).sum()), len(ids)


def exact_match(predicted_ids: np.ndarray, batch: dict) -> float:
  """Fraction of the batch's questions whose answer tokens are all predicted exactly."""
  correct, total = exact_match_counts(predicted_ids, batch)
  return correct / max(total, 1)
