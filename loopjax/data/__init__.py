"""loopjax's data: prepared corpora and built-in synthetic tasks as grain pipelines of packed batches.

A batch is a dict of process-local numpy arrays, each [local_batch, seq_len]: `inputs` and `targets`
(int32 token ids, targets = next token of the same document), `loss_mask` (float32, 0 on padding and
never across documents), `segment_ids` (int32, 0 = padding, 1.. = documents in the row) and
`positions` (int32, restarting at 0 per document).

The functions import their modules themselves: importing any loopjax.data module runs this file, and
`loopjax prepare`'s Beam workers, which need only the readers, the tokenizer and the record format, would
otherwise each import grain and JAX (seconds per worker process).
"""


def make_train_iterator(data_cfg, *, seq_len: int, global_batch: int, seed: int,
                        process_index: int = 0, process_count: int = 1):
  """This process's unbounded stream of training batches with global_batch // process_count rows
  (a pipeline.ShardedIterator).

  The global batch does not depend on process_count (see pipeline.py). The iterator's
  get_state()/set_state() resume the exact stream (put the state in checkpoints). data.num_workers > 0
  starts one pool of that many grain worker processes for all of this process's shards.
  """
  from loopjax.data import pipeline
  shards = pipeline.num_shards(data_cfg, global_batch)
  if global_batch % shards or shards % process_count:
    raise ValueError(f"data.num_shards={shards} must divide the global batch {global_batch} and be a "
                     f"multiple of the {process_count} processes")
  per_process = shards // process_count
  mine = range(process_index * per_process, (process_index + 1) * per_process)
  return pipeline.ShardedIterator({
      shard: pipeline.build_dataset(data_cfg, seq_len=seq_len, local_batch=global_batch // shards, seed=seed,
                                    shard=shard, shard_count=shards)
      for shard in mine}, num_workers=data_cfg.num_workers)


def data_vocab_size(data_cfg) -> int:
  """The smallest model vocabulary that covers every token id the configured sources produce."""
  from loopjax.data import pipeline, records, tasks
  sizes = []
  for name in pipeline.source_names(data_cfg):
    if name in tasks.TASK_NAMES:
      sizes.append(tasks.make_task(name, data_cfg).vocab_size)
    else:
      sizes.append(records.read_manifest(name)["tokenizer"]["vocab_size"])
  return max(sizes)

