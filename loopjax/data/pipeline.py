"""The grain training pipeline: sources -> data shards -> shuffle -> mixture -> packed rows -> batches.

The data is split into `num_shards` logical shards, fixed by the config and not by the number of
processes: shard k reads every num_shards-th document starting at k, packs its own rows, and gives
global_batch / num_shards rows to every global batch. A process owns a contiguous block of shards and
its local batch is their rows in shard order, so the global batch (processes in order) is the same
whatever the process count, and the iterator state is a per-shard dict that a checkpoint can hand to
a different number of processes. The shards are disjoint and together cover every source.

Corpora are shuffled per epoch by grain's index shuffle (a permutation, so it needs no buffer and
restores from an index); synthetic tasks are random already. Weighted mixtures use grain's
MapDataset.mix. Everything after `to_iter_dataset` (chunking, packing, batching) is a grain
IterDataset, so `get_state()/set_state()` resumes the exact stream.

A process's shards are read in lock step as one IterDataset (Lockstep), so `data.num_workers > 0` is one
mp_prefetch pool per process: a pool per shard would start num_workers x local shards processes (256 for
64 shards and 4 workers). The stream and the per-shard state are the same as a pool per shard's.
"""

import math
import sys

import grain
import numpy as np

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


def num_shards(data_cfg, global_batch: int) -> int:
  """data.num_shards, or by default gcd(global_batch, 64): up to 64 processes can share the stream."""
  return data_cfg.num_shards or math.gcd(global_batch, 64)


def documents(name: str, data_cfg, *, seed: int, shard: int, shard_count: int,
              num_epochs: int | None) -> grain.MapDataset:
  """One shard's documents of one source, in training order (unbounded unless num_epochs)."""
  if name in tasks.TASK_NAMES:
    task = tasks.make_task(name, data_cfg)
    indices = grain.MapDataset.range(sys.maxsize)[shard::shard_count]
    return indices.map(lambda i: task.train_example(seed, i))
  docs = records.corpus_documents(name)[shard::shard_count]
  if data_cfg.shuffle:
    docs = docs.shuffle(seed=seed)
  return docs.repeat(num_epochs)


def build_dataset(data_cfg, *, seq_len: int, local_batch: int, seed: int, shard: int = 0,
                  shard_count: int = 1, num_epochs: int | None = None,
                  drop_remainder: bool = True) -> grain.IterDataset:
  """The IterDataset of one shard's batches (`local_batch` rows); unbounded unless num_epochs."""
  names = source_names(data_cfg)
  sources = [documents(name, data_cfg, seed=_source_seed(seed, i), shard=shard, shard_count=shard_count,
                       num_epochs=num_epochs)
             for i, name in enumerate(names)]
  docs = sources[0] if len(sources) == 1 else grain.MapDataset.mix(sources, source_weights(data_cfg))
  loss_on = data_cfg.loss_on
  examples = docs.map(lambda doc: packing.lm_example(doc, loss_on=loss_on))
  examples = examples.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.read_threads))
  rows = packing.pack(examples, seq_len=seq_len, mode=data_cfg.packing,
                      num_bins=data_cfg.packing_bins or local_batch, seed=seed)
  return rows.batch(local_batch, drop_remainder=drop_remainder)


class Lockstep(grain.IterDataset):
  """A process's shards as one IterDataset: each element is their batches concatenated in shard order.

  One dataset so that one mp_prefetch pool serves all the process's shards. A pool's worker w slices
  every shard's documents [w::num_workers], as a pool per shard did, and the pool takes the workers'
  elements in turn, so the stream is the one of a pool per shard (tests/test_data_workers.py).
  """

  def __init__(self, shard_datasets: dict[int, grain.IterDataset]):
    self.shards = sorted(shard_datasets)
    super().__init__([shard_datasets[shard] for shard in self.shards])

  def __iter__(self):
    return _LockstepIterator([iter(ds) for ds in self.parents], self.shards)


class _LockstepIterator(grain.DatasetIterator):
  """Its state is {str(shard): that shard's state}."""

  def __init__(self, shard_iterators: list, shards: list[int]):
    super().__init__(shard_iterators)
    self.keys = [str(shard) for shard in shards]

  def __next__(self) -> dict:
    parts = [next(it) for it in self._parents]
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    return {key: it.get_state() for key, it in zip(self.keys, self._parents)}

  def set_state(self, state: dict):
    for key, it in zip(self.keys, self._parents):
      it.set_state(state[key])


_WORKER_STATES = "iterators_in_use_states"  # the per-worker states in grain's mp_prefetch state


class ShardedIterator:
  """A process's data shards read in lock step (Lockstep), behind one pool of `num_workers` processes.

  `get_state()` is {str(shard): that shard's state}; `set_state()` takes a dict holding (at least) this
  process's shards, e.g. one gathered from every process of a run with another count. With workers,
  grain's state is the pool's, one Lockstep state per worker; a shard's entry is that state with each
  worker's state narrowed to the shard (the state a pool of that shard alone would have), so the
  conversion loses nothing and any process layout resumes the exact stream.
  """

  def __init__(self, shard_datasets: dict[int, grain.IterDataset], num_workers: int = 0):
    self.keys, self.num_workers = [str(shard) for shard in sorted(shard_datasets)], num_workers
    ds = Lockstep(shard_datasets)
    if num_workers > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    self.iterator = iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self.iterator)

  def get_state(self) -> dict:
    state = self.iterator.get_state()
    if not self.num_workers:
      return state
    return {key: {**state, _WORKER_STATES: [w[key] for w in state[_WORKER_STATES]]} for key in self.keys}

  def set_state(self, state: dict):
    missing = [int(key) for key in self.keys if key not in state]
    if missing:
      raise ValueError(f"the data state has no entry for shards {missing}: it was saved with a different "
                       "data.num_shards")
    saved = {len(state[key].get(_WORKER_STATES, ())) for key in self.keys}
    if saved != {self.num_workers}:
      raise ValueError(f"the data state was saved with data.num_workers={min(saved)}: resume with that "
                       f"(this run has {self.num_workers})")
    if self.num_workers:  # the shards share the pool's other fields (lock step): take the first's
      state = {**state[self.keys[0]], _WORKER_STATES: [{key: state[key][_WORKER_STATES][w] for key in self.keys}
                                                       for w in range(self.num_workers)]}
    self.iterator.set_state(state)

  def close(self):
    self.iterator.close()
