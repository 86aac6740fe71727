"""The grain pipeline over prepared ArrayRecord corpora: packing, process slices, exact resume, mixtures."""

import collections
import itertools

import numpy as np
import pytest

from loopjax import config
from loopjax.data import make_train_iterator, pipeline, prepare

SEQ = 32


def write_docs(path, docs):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n<doc>\n".join(docs), encoding="utf-8")


def prepared(tmp_path, name, docs) -> str:
  write_docs(tmp_path / name / "in.txt", docs)
  out = str(tmp_path / name / "out")
  prepare.prepare([str(tmp_path / name / "in.txt")], out, prepare.Options(txt_separator="\n<doc>\n"))
  return out


def make_docs(prefix, n, seed=0, max_len=80):
  """Distinct documents; some longer than SEQ so they are cut into chunks."""
  rng = np.random.default_rng(seed)
  return [f"{prefix}{i}:" + "".join(rng.choice(list("abcdefgh "), size=int(rng.integers(1, max_len))))
          for i in range(n)]


def data_cfg(source, **overrides):
  c = config.default_config().data
  c.source = source
  for k, v in overrides.items():
    c[k] = v
  return c


def segments(batches):
  """Every (row, segment) of the batches as (tokens = inputs[0] + targets, positions, loss_mask)."""
  for b in batches:
    for row in range(b["inputs"].shape[0]):
      seg = b["segment_ids"][row]
      ids = [s for s in np.unique(seg) if s > 0]
      assert ids == list(range(1, len(ids) + 1)), "segment ids are not 1..k"
      for s in ids:
        sel = seg == s
        yield (np.concatenate([b["inputs"][row][sel][:1], b["targets"][row][sel]]),
               b["positions"][row][sel], b["loss_mask"][row][sel])


def one_epoch(cfg, **kw):
  ds = pipeline.build_dataset(cfg, seq_len=SEQ, local_batch=4, seed=3, num_epochs=1,
                              drop_remainder=False, **kw)
  return list(ds)


@pytest.mark.parametrize("mode", ["document", "concat"])
def test_an_epoch_packs_every_target_exactly_once(tmp_path, mode):
  docs = make_docs("d", 60)
  batches = one_epoch(data_cfg(prepared(tmp_path, "c", docs), packing=mode))
  doc_bytes = [b"\x00" + d.encode() for d in docs]  # \x00 stands for the document-start token 256
  targets = collections.Counter()
  for tokens, positions, loss_mask in segments(batches):
    assert positions.tolist() == list(range(len(positions)))
    assert (loss_mask == 1).all()
    window = bytes(np.where(tokens == 256, 0, tokens).astype(np.uint8))
    assert any(window in d for d in doc_bytes), "a segment is not a contiguous piece of one document"
    targets.update(tokens[1:].tolist())
  expected = collections.Counter(t for d in doc_bytes for t in d[1:])
  assert targets == expected
  for b in batches:
    assert (b["loss_mask"][b["segment_ids"] == 0] == 0).all()
    if mode == "document":  # padding only after the documents of a row
      assert all((np.diff((row == 0).astype(int)) >= 0).all() for row in b["segment_ids"])


def test_shards_read_disjoint_slices_covering_the_corpus(tmp_path):
  docs = make_docs("d", 50, max_len=SEQ - 8)  # whole documents fit in a row
  cfg = data_cfg(prepared(tmp_path, "c", docs))
  seen = []
  for shard in range(2):
    batches = one_epoch(cfg, shard=shard, shard_count=2)
    seen.append({bytes(t[1:].astype(np.uint8)).decode() for t, _, _ in segments(batches)})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(docs)
  it = make_train_iterator(cfg, seq_len=SEQ, global_batch=8, seed=0, process_index=1, process_count=2)
  assert next(it)["inputs"].shape == (4, SEQ)


@pytest.mark.parametrize("source", ["corpus", "mano"])
def test_global_batches_and_states_do_not_depend_on_the_process_count(tmp_path, source):
  """1, 2 and 4 processes see the same global batches; a state saved by 2 processes resumes 1 and 4."""
  cfg = data_cfg(prepared(tmp_path, "c", make_docs("d", 40)) if source == "corpus" else "mano")
  def local_iterators(count):
    return [make_train_iterator(cfg, seq_len=SEQ, global_batch=8, seed=5, process_index=p, process_count=count)
            for p in range(count)]
  def global_batches(iterators, steps):
    return [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
            for parts in zip(*(list(itertools.islice(it, steps)) for it in iterators))]
  single = global_batches(local_iterators(1), 12)
  two = local_iterators(2)
  _assert_same(global_batches(two, 5), single[:5])
  _assert_same(global_batches(local_iterators(4), 12), single)
  saved = {k: v for it in two for k, v in it.get_state().items()}  # what a checkpoint gathers
  for count in (1, 4):
    resumed = local_iterators(count)
    for it in resumed:
      it.set_state(saved)
    _assert_same(global_batches(resumed, 7), single[5:])


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("source,mode", [("corpus", "document"), ("corpus", "concat"), ("mix", "document"),
                                         ("mano", "document")])
def test_restored_iterator_continues_exactly(tmp_path, source, mode):
  corpus = prepared(tmp_path, "c", make_docs("d", 40))
  cfg = data_cfg({"corpus": corpus, "mix": f"{corpus},mano", "mano": "mano"}[source], packing=mode)
  it = make_train_iterator(cfg, seq_len=SEQ, global_batch=4, seed=7)
  for _ in range(13):  # past the end of the first epoch of the corpus
    next(it)
  state = it.get_state()
  expected = list(itertools.islice(it, 20))
  restored = make_train_iterator(cfg, seq_len=SEQ, global_batch=4, seed=7)
  restored.set_state(state)
  _assert_same(list(itertools.islice(restored, 20)), expected)


def test_mixture_follows_the_weights(tmp_path):
  a = prepared(tmp_path, "a", make_docs("A", 30, max_len=10))
  b = prepared(tmp_path, "b", make_docs("B", 30, seed=1, max_len=10))
  it = make_train_iterator(data_cfg(f"{a},{b}", weights="3,1"), seq_len=SEQ, global_batch=4, seed=0)
  firsts = [chr(t[1]) for t, _, _ in segments(itertools.islice(it, 60))]
  share = firsts.count("A") / len(firsts)
  assert len(firsts) > 300 and 0.7 < share < 0.8, share


def test_epochs_are_shuffled_differently(tmp_path):
  cfg = data_cfg(prepared(tmp_path, "c", make_docs("d", 20, max_len=10)))
  ds = pipeline.build_dataset(cfg, seq_len=SEQ, local_batch=1, seed=0, num_epochs=2, drop_remainder=False)
  order = [bytes(t[1:].astype(np.uint8)).decode() for t, _, _ in segments(ds)]
  first, second = order[:20], order[20:]
  assert sorted(first) == sorted(second) and first != second
