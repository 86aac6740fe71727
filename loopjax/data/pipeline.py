"""The grain training pipeline: sources -> this process's slice -> shuffle -> mixture -> packed batches.

Each source is a MapDataset of documents. A process keeps every process_count-th document starting at
its process_index before anything random happens, so the processes read disjoint slices whose union is
the whole source, with no coordination. Corpora are shuffled per epoch by grain's index shuffle
(a permutation, so it needs no buffer and restores from an index); synthetic tasks are random already.
Weighted mixtures use grain's MapDataset.mix. Everything after `to_iter_dataset` (chunking, packing,
batching) is a grain IterDataset, so `get_state()/set_state()` resumes the exact stream.
"""

import sys

import grain

from loopjax.data import packing, records, tasks


def source_names(data_cfg) -> list[str]:
  """data.source is one name or a comma-separated list: task names and prepared corpus directories."""
  return [s.strip() for s in str(data_cfg.source).split(",") if s.strip()]


def source_weights(data_cfg) -> list[float] | None:
  """data.weights: comma-separated mixture weights, one per source; empty means equal weights."""
  text = str(data_cfg.weights).strip()
  return [float(w) for w in text.split(",")] if text else None


def _source_seed(seed: int, i: int) -> int:
  """Distinct shuffle seeds per source in [0, 2**32), so two corpora are not shuffled alike."""
  return (seed * 1_000_003 + 7_919 * i) % 2**32


def documents(name: str, data_cfg, *, seed: int, process_index: int, process_count: int,
              num_epochs: int | None) -> grain.MapDataset:
  """This process's documents of one source, in training order (unbounded unless num_epochs)."""
  if name in tasks.TASK_NAMES:
    task = tasks.make_task(name, data_cfg)
    indices = grain.MapDataset.range(sys.maxsize)[process_index::process_count]
    return indices.map(lambda i: task.train_example(seed, i))
  docs = records.corpus_documents(name)[process_index::process_count]
  if data_cfg.shuffle:
    docs = docs.shuffle(seed=seed)
  return docs.repeat(num_epochs)


def build_dataset(data_cfg, *, seq_len: int, local_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1, num_epochs: int | None = None,
                  drop_remainder: bool = True) -> grain.IterDataset:
  """The IterDataset of batches for one process; unbounded unless num_epochs is given."""
  names = source_names(data_cfg)
  sources = [documents(name, data_cfg, seed=_source_seed(seed, i), process_index=process_index,
                       process_count=process_count, num_epochs=num_epochs)
             for i, name in enumerate(names)]
  docs = sources[0] if len(sources) == 1 else grain.MapDataset.mix(sources, source_weights(data_cfg))
  loss_on = data_cfg.loss_on
  examples = docs.map(lambda doc: packing.lm_example(doc, loss_on=loss_on))
  examples = examples.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.read_threads))
  rows = packing.pack(examples, seq_len=seq_len, mode=data_cfg.packing,
                      num_bins=data_cfg.packing_bins or local_batch, seed=seed)
  batches = rows.batch(local_batch, drop_remainder=drop_remainder)
  if data_cfg.num_workers > 0:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  return batches
