"""loopjax's data: prepared corpora and built-in synthetic tasks as grain pipelines of packed batches.

A batch is a dict of process-local numpy arrays, each [local_batch, seq_len]: `inputs` and `targets`
(int32 token ids, targets = next token of the same document), `loss_mask` (float32, 0 on padding and
never across documents), `segment_ids` (int32, 0 = padding, 1.. = documents in the row) and
`positions` (int32, restarting at 0 per document).
"""

import grain

from loopjax.data import pipeline, records, tasks


def make_train_iterator(data_cfg, *, seq_len: int, global_batch: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """This process's unbounded stream of training batches with global_batch // process_count rows.

  The iterator's get_state()/set_state() resume the exact stream (put the state in checkpoints).
  """
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
  dataset = pipeline.build_dataset(data_cfg, seq_len=seq_len, local_batch=global_batch // process_count,
                                   seed=seed, process_index=process_index, process_count=process_count)
  return iter(dataset)


def data_vocab_size(data_cfg) -> int:
  """The smallest model vocabulary that covers every token id the configured sources produce."""
  sizes = []
  for name in pipeline.source_names(data_cfg):
    if name in tasks.TASK_NAMES:
      sizes.append(tasks.make_task(name, data_cfg).vocab_size)
    else:
      sizes.append(records.read_manifest(name)["tokenizer"]["vocab_size"])
  return max(sizes)


from loopjax.data.evaluate import exact_match, exact_match_counts, make_eval_batches  # noqa: E402
