"""data.num_workers: one grain worker pool per process gives the stream and states of a pool per shard."""

import itertools
import json
import multiprocessing

import grain
import numpy as np
import pytest

from loopjax.cli.runtime import allow_grain_workers
from loopjax.data import make_train_iterator, pipeline
from test_data_pipeline import SEQ, _assert_same, data_cfg, make_docs, prepared

STEPS = 7  # past a few rounds of the workers (odd, so the pool stops mid-round)


def per_shard_pools(cfg, shards, global_batch, seed):
  """What make_train_iterator did before: an mp_prefetch pool per shard, read in lock step."""
  iterators = []
  for shard in shards:
    ds = pipeline.build_dataset(cfg, seq_len=SEQ, local_batch=global_batch // cfg.num_shards, seed=seed,
                                shard=shard, shard_count=cfg.num_shards)
    if cfg.num_workers:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    iterators.append(iter(ds))
  batches = [{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
             for parts in zip(*(list(itertools.islice(it, STEPS)) for it in iterators))]
  return batches, {str(shard): it.get_state() for shard, it in zip(shards, iterators)}, iterators


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.multiprocess)])
def test_one_pool_per_process_is_a_pool_per_shard_and_resumes_any_layout(tmp_path, workers):
  """Batches and per-shard states equal a pool per shard's; the state resumes 1 process and 1 of 2."""
  allow_grain_workers()
  corpus = prepared(tmp_path, "c", make_docs("d", 40))
  cfg = data_cfg(f"{corpus},mano", num_shards=2, num_workers=workers)
  def iterator(process_index=0, process_count=1):
    return make_train_iterator(cfg, seq_len=SEQ, global_batch=8, seed=3, process_index=process_index,
                               process_count=process_count)
  one = iterator()
  batches = list(itertools.islice(one, STEPS))
  assert len(multiprocessing.active_children()) == workers  # one pool for both shards
  state = one.get_state()
  expected, expected_state, pools = per_shard_pools(cfg, [0, 1], global_batch=8, seed=3)
  _assert_same(batches, expected)
  assert state == expected_state
  following = list(itertools.islice(one, STEPS))
  same_layout, second_of_two = iterator(), iterator(1, 2)
  for it in (same_layout, second_of_two):
    it.set_state(json.loads(json.dumps(state)))  # as a checkpoint stores it
  _assert_same(list(itertools.islice(same_layout, STEPS)), following)
  shard_1 = [{k: v[4:] for k, v in b.items()} for b in following]  # its rows of the global batch
  _assert_same(list(itertools.islice(second_of_two, STEPS)), shard_1)
  for it in (one, same_layout, second_of_two, *pools):
    it.close()


def test_a_state_saved_with_other_workers_is_refused():
  """A pool's state and a pool-less one differ in form: say which data.num_workers resumes it."""
  cfg = data_cfg("mano")
  state = make_train_iterator(cfg, seq_len=SEQ, global_batch=4, seed=0).get_state()
  cfg.num_workers = 2
  it = make_train_iterator(cfg, seq_len=SEQ, global_batch=4, seed=0)  # starts no process before next()
  with pytest.raises(ValueError, match=r"saved with data.num_workers=0: resume with that \(this run has 2\)"):
    it.set_state(state)
  it.close()
