"""Start-up checks of config.data, called from config.validate before anything is built.

Each failure is one ConfigError naming the field and the fix, e.g. a corpus directory that prepare
never finished, mixture weights that do not match the sources, corpora prepared with different
tokenizers, or a model vocabulary smaller than the ids the data contains.
"""

import jax

from loopjax import config, data
from loopjax.data import packing, pipeline, records, tasks

_POSITIVE = ("mano_max_ops", "multihop_people", "multihop_relations", "capo_people", "capo_attributes")
_NON_NEGATIVE = ("num_shards", "packing_bins", "num_workers", "read_threads", "task_seed", "multihop_train_questions")


def _fail(field: str, problem: str, fix: str):
  raise config.ConfigError(f"config.{field}: {problem}. Fix: {fix}.")


def _check_sources(d) -> None:
  """Every source is a task or a finished corpus; corpora agree on the tokenizer; weights fit."""
  names = pipeline.source_names(d)
  if not names:
    _fail("data.source", "is empty", f"name a task ({', '.join(tasks.TASK_NAMES)}) or prepared corpus dirs")
  manifests = []
  for name in names:
    if name in tasks.TASK_NAMES:
      continue
    try:
      manifests.append(records.read_manifest(name))
    except records.CorpusError as e:
      _fail("data.source", e.problem, e.fix)
  identities = {str(m["tokenizer"]) for m in manifests}
  if len(identities) > 1:
    _fail("data.source", f"the corpora were prepared with different tokenizers ({sorted(identities)})",
          "prepare every corpus of a mixture with the same tokenizer")
  try:
    weights = pipeline.source_weights(d)
  except ValueError:
    _fail("data.weights", f"{d.weights!r} is not a comma-separated list of numbers", "e.g. 0.7,0.3")
  if weights is not None:
    if len(weights) != len(names):
      _fail("data.weights", f"{len(weights)} weights for {len(names)} sources",
            "give one weight per data.source entry, or '' for equal weights")
    if min(weights) < 0 or sum(weights) <= 0:
      _fail("data.weights", f"{weights} has a negative weight or sums to 0", "use non-negative weights")


def validate_data(cfg) -> None:
  """Raises ConfigError for a data config that cannot work with this model and seed."""
  d = cfg.data
  if d.packing not in packing.PACKING_MODES:
    _fail("data.packing", f"{d.packing!r} is not one of {packing.PACKING_MODES}",
          f"set --config.data.packing to one of {packing.PACKING_MODES}")
  if d.loss_on not in packing.LOSS_ON:
    _fail("data.loss_on", f"{d.loss_on!r} is not one of {packing.LOSS_ON}",
          f"set --config.data.loss_on to one of {packing.LOSS_ON}")
  for field in _POSITIVE:
    if d[field] < 1:
      _fail(f"data.{field}", f"must be >= 1, got {d[field]}", f"set --config.data.{field} to a positive integer")
  for field in _NON_NEGATIVE:
    if d[field] < 0:
      _fail(f"data.{field}", f"must be >= 0, got {d[field]}", f"set --config.data.{field} to 0 or more")
  if d.multihop_max_hops < 2:
    _fail("data.multihop_max_hops", f"must be >= 2, got {d.multihop_max_hops} (1-hop questions are the "
          "facts, all of them trained on)", "evaluate composition with at least 2 hops")
  if d.capo_values < 2:
    _fail("data.capo_values", f"must be >= 2, got {d.capo_values}", "give each attribute 2 or more values")
  if cfg.train.seed < 0:
    _fail("train.seed", f"must be >= 0 (it seeds the data pipeline), got {cfg.train.seed}",
          "use a non-negative seed")
  shards, processes = pipeline.num_shards(d, cfg.train.batch_size), jax.process_count()
  if cfg.train.batch_size % shards or shards % processes:
    _fail("data.num_shards", f"{shards} shards must divide train.batch_size={cfg.train.batch_size} and be a "
          f"multiple of the {processes} processes", "choose a divisor of the batch that the process count divides")
  _check_sources(d)
  need = data.data_vocab_size(d)
  if cfg.model.vocab_size < need:
    _fail("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the {need} token ids data.source "
          f"uses", f"set --config.model.vocab_size to at least {need}")
