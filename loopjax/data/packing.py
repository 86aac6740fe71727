"""Documents -> fixed-length training rows: next-token pairs, long-document chunks, packing, batch keys.

Every document becomes its own (inputs, targets) pair before packing, so no target ever crosses a
document boundary and the loss mask only has to drop padding. Two packing modes:

- "document": grain's first-fit packing. A row holds whole documents (longer ones are first cut into
  chunks of seq_len targets, each chunk repeating the previous chunk's last token as its first input so
  no target is lost), padded at the end; positions restart at 0 per document (per chunk).
- "concat": grain's concatenate-and-split. Rows are full; a document cut at a row end continues in the
  next row as a new segment.

Either way each row carries segment ids (0 = padding, 1.. = documents) and per-document positions,
under the batch keys of the loopjax batch contract.
"""

import grain
import numpy as np
from grain import experimental as gx

PACKING_MODES = ("document", "concat")
LOSS_ON = ("all", "answer")
_SEQUENCE_KEYS = ("inputs", "targets", "loss_mask")


def lm_example(doc: dict, *, loss_on: str, keep_answer_mask: bool = False) -> dict:
  """A document {"tokens"[n], optional "answer_mask"[n-1]} -> next-token features of length n-1.

  loss_on="answer" trains only on answer targets (synthetic tasks); documents without an answer mask
  (text corpora) always train on every target.
  """
  tokens_n = doc["tokens"]
  answer_mask = doc.get("answer_mask")
  if loss_on == "answer" and answer_mask is not None:
    loss_mask = answer_mask.astype(np.float32)
  else:
    loss_mask = np.ones(len(tokens_n) - 1, np.float32)
  example = {
      "inputs": tokens_n[:-1].astype(np.int32),
      "targets": tokens_n[1:].astype(np.int32),
      "loss_mask": loss_mask,
  }
  if keep_answer_mask:
    example["answer_mask"] = answer_mask.astype(np.float32)
  return example


class SplitLongExamples(gx.FlatMapTransform):
  """Cuts an example with more than seq_len targets into consecutive chunks of at most seq_len.

  Because inputs/targets are already shifted pairs, plain slicing keeps every target exactly once.
  """

  # grain's iterator-level flat map does not preallocate by fan-out; this is only an upper bound
  # for documentation (a 2**20 x seq_len token document).
  max_fan_out = 2**20

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def flat_map(self, example):
    n = len(example["targets"])
    if n <= self._seq_len:
      return [example]
    return [{k: v[start:start + self._seq_len] for k, v in example.items()}
            for start in range(0, n, self._seq_len)]


def _to_batch_keys(row: dict) -> dict:
  """grain names packing metadata per feature ("inputs_segment_ids"); the contract has one of each."""
  out = {k: row[k] for k in _SEQUENCE_KEYS}
  if "answer_mask" in row:
    out["answer_mask"] = row["answer_mask"]
  out["segment_ids"] = row["inputs_segment_ids"].astype(np.int32)
  out["positions"] = row["inputs_positions"].astype(np.int32)
  return out


def pack(examples: grain.IterDataset, *, seq_len: int, mode: str, num_bins: int, seed: int,
         with_answer_mask: bool = False) -> grain.IterDataset:
  """Variable-length lm examples -> rows of exactly seq_len with segment_ids and positions."""
  if mode not in PACKING_MODES:
    raise ValueError(f"packing mode {mode!r} is not one of {PACKING_MODES}")
  keys = _SEQUENCE_KEYS + (("answer_mask",) if with_answer_mask else ())
  lengths = {k: seq_len for k in keys}
  if mode == "concat":
    rows = gx.ConcatThenSplitIterDataset(examples, length_struct=lengths)
  else:
    chunks = gx.FlatMapIterDataset(examples, SplitLongExamples(seq_len))
    rows = gx.FirstFitPackIterDataset(chunks, length_struct=lengths, num_packing_bins=num_bins,
                                      seed=seed, shuffle_bins=True)
  return rows.map(_to_batch_keys)

