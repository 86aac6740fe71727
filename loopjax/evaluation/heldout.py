"""Which data held-out evaluation reads, decided in one place.

Teacher-forced evaluation (`teacher_forced.py`) and Q-exit decoding (`generation.py`) both score the
run's held-out data; `eval_source` is the one rule for what that is, so a change of default (say, a
prepared corpus's validation split) is made here and nowhere else.
"""

from loopjax.data import pipeline, records, tasks


def eval_source(cfg) -> str:
  """The held-out data: `eval.source`; else the validation splits `loopjax prepare --validation_fraction`
  held out of the training corpora (when every one has one: scoring the first training batches would
  score what the model was trained on); else the training source (a synthetic task's held-out set)."""
  if str(cfg.eval.source).strip():
    return str(cfg.eval.source).strip()
  return records.validation_source(pipeline.source_names(cfg.data)) or str(cfg.data.source).strip()


def eval_data_cfg(cfg):
  """`cfg.data` with its source replaced by the held-out data."""
  data_cfg = cfg.data.copy_and_resolve_references()
  with data_cfg.unlocked():
    data_cfg.source = eval_source(cfg)
  return data_cfg


def is_task(cfg) -> bool:
  """Whether the held-out data is one built-in synthetic task (whose answers can be scored)."""
  names = pipeline.source_names(eval_data_cfg(cfg))
  return len(names) == 1 and names[0] in tasks.TASK_NAMES
