"""A benchmark sweep over depths in one process: tasks loaded once, every T and Q-exit threshold scored.

    loopjax eval --checkpoint runs/smoke --harness multihop_mc,multihop_gen --loop_steps 1,2,4,8 --exit_thresholds 0.5

`load_tasks` finds and loads the tasks once (failing on an unknown name or a dataset that cannot be
had, one line each); `Sweep` evaluates them with lm-eval's own `evaluate` at each depth, one `DepthLM`
per depth over a shared memo, so every log-likelihood row runs one forward at the deepest T for all
depths (loop step t does not depend on the steps after it); generation runs once per depth. Results are
flat metrics, `harness/<task>/<metric>/T<t>` and `.../q<q>`, plus `.../mean_exit_step/...`: the loop
steps the scored or generated tokens actually ran (T at full depth).
"""

import contextlib
import io
import logging

from loopjax.evaluation.harness import HarnessError, local_tasks, require_lm_eval
from loopjax.evaluation.harness.depth import Depth, sweep_depths

PREFIX = "harness/"
FEWSHOT_SEED = 1234  # lm-eval's default fewshot seed (simple_evaluate's)


def _manager(names: list[str], include_path: str):
  """A TaskManager that knows `names`: the shipped and user tasks alone when that is enough (fast), else
  with lm-eval's own tasks too (indexing them takes ~10 s)."""
  from lm_eval.tasks import TaskManager
  paths = [local_tasks.TASKS_DIR] + ([include_path] if include_path else [])
  manager = TaskManager(include_defaults=False, include_path=paths)
  return manager if set(names) <= set(manager.all_tasks) else TaskManager(include_path=paths)


def load_tasks(names: list[str], include_path: str = "", what: str = "--harness") -> dict:
  """lm-eval's loaded task dict for `names`, zero-shot unless a task says otherwise."""
  require_lm_eval()
  if not names:
    raise HarnessError(f"{what}: no task named. Fix: give comma-separated task names, e.g. "
                       f"{','.join(local_tasks.NAMES)}")
  logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notes would bury the table
  import datasets
  datasets.disable_progress_bars()  # "Generating test split" bars when a task's data is first cached
  datasets.utils.logging.set_verbosity_error()
  manager = _manager(names, include_path)
  unknown = [n for n in names if n not in manager.all_tasks]
  if unknown:
    where = f" or in {include_path}" if include_path else ""
    raise HarnessError(f"{what}: unknown task {unknown[0]!r} (not one of lm-eval's tasks{where}). Fix: "
                       f"`lm_eval ls tasks` lists them; the shipped local ones are {', '.join(local_tasks.NAMES)}; "
                       "your own task YAMLs need --include_path DIR")
  loaded = {"tasks": {}, "groups": {}, "group_map": {}}
  for name in names:
    try:
      one = manager.load([name])
    except OSError as e:  # datasets' ConnectionError / FileNotFoundError: the hub is out of reach
      raise HarnessError(f"{what}: task {name!r} needs a dataset that is not available here ({e}). Fix: run it "
                         "once where the Hugging Face hub is reachable, with HF_DATASETS_CACHE on a disk this "
                         "machine reads (BUILD.md, \"Evaluation\"), or use a local task (--include_path)") from None
    for key in loaded:
      loaded[key].update(one[key])
  for task in loaded["tasks"].values():
    if task.get_config("num_fewshot") is None:
      task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)
  return loaded


def flatten(results: dict, depth: Depth) -> dict:
  """lm-eval's results -> {harness/<task>/<metric>/<depth>: value}. Its keys are "<metric>,<filter>"
  ("acc,none"); stderrs (not computed: no bootstrap) and bookkeeping ("alias", "sample_len") are left out."""
  flat = {}
  for task, metrics in results["results"].items():
    for key, value in metrics.items():
      name, comma, filter_name = key.partition(",")
      if not comma or name.endswith("_stderr") or not isinstance(value, (int, float)):
        continue
      metric = name if filter_name == "none" else f"{name}_{filter_name}"
      flat[f"{PREFIX}{task}/{metric}/{depth.label}"] = float(value)
  return flat


class Sweep:
  """The loaded tasks at every depth of `depths`, for any parameters of one model (compiled once).

  `quiet` drops what lm-eval writes to stderr while it runs: a progress bar per task and depth, which
  in a training log would come every `eval.harness_every_steps` steps.
  """

  def __init__(self, model, tasks: dict, depths: list[Depth], *, batch_rows: int, limit: int | None = None,
               quiet: bool = False):
    from loopjax.evaluation.harness.scorer import Scorer
    self.model, self.tasks, self.depths, self.limit, self.quiet = model, tasks, depths, limit, quiet
    self.scorer = Scorer(model.model_cfg, model.mesh, depths, batch_rows=batch_rows, max_len=model.max_len)

  def __call__(self, params=None) -> dict:
    """Flat metrics at every depth; `params` replace the model's (the training hook's live ones)."""
    from lm_eval.evaluator import evaluate

    from loopjax.evaluation.harness.backend import DepthLM
    model = self.model if params is None else self.model._replace(params=params)
    memo, flat = {}, {}
    for depth in self.depths:
      lm = DepthLM(model, depth, self.scorer, memo)
      with contextlib.redirect_stderr(io.StringIO()) if self.quiet else contextlib.nullcontext():
        results = evaluate(lm=lm, task_dict=self.tasks, limit=self.limit, bootstrap_iters=0, log_samples=False)
      flat.update(flatten(results, depth))
      for task, (steps, tokens) in lm.depth_tally.items():
        flat[f"{PREFIX}{task}/mean_exit_step/{depth.label}"] = steps / max(tokens, 1)
    return flat


def format_table(results: dict) -> str:
  """One row per task and metric, one column per depth (in the order evaluated)."""
  rows, labels = {}, []
  for key, value in results.items():
    if key.startswith(PREFIX):
      task, metric, label = key[len(PREFIX):].rsplit("/", 2)
      rows.setdefault(f"{task} {metric}", {})[label] = value
      labels += [label] if label not in labels else []
  width = max(map(len, rows), default=10)
  lines = [f"{'task metric':<{width}} " + " ".join(f"{label:>10}" for label in labels)]
  for name, values in rows.items():
    lines.append(f"{name:<{width}} " + " ".join(f"{values[label]:>10.4g}" if label in values else f"{'':>10}"
                                                for label in labels))
  return "\n".join(lines)


def training_tasks(cfg) -> dict:
  """The tasks of `eval.harness_tasks`, loaded at a run's start-up, its tokenizer and depths checked (one
  line each)."""
  from loopjax.evaluation.harness import model
  model.run_tokenizer_or_fail(cfg)
  _training_depths(cfg)
  names = [t.strip() for t in str(cfg.eval.harness_tasks).split(",") if t.strip()]
  return load_tasks(names, what="config.eval.harness_tasks")


def training_sweep(cfg, mesh, tasks: dict) -> Sweep:
  """The sweep of a training segment (`cfg` its config): every `eval.loop_steps` T and Q-exit at
  `eval.q_exit`, on the trainer's mesh; call it with the live parameters."""
  from loopjax.evaluation.harness import model
  from loopjax.evaluation.harness.backend import DEFAULT_BATCH_ROWS
  live = model.HarnessModel(cfg.model, None, mesh, model.run_tokenizer_or_fail(cfg), int(cfg.train.seq_len), ())
  return Sweep(live, tasks, _training_depths(cfg), batch_rows=DEFAULT_BATCH_ROWS, limit=cfg.eval.harness_limit or None,
               quiet=True)


def _training_depths(cfg) -> list[Depth]:
  return sweep_depths(cfg.eval.loop_steps, str(cfg.eval.q_exit), cfg.model.loop_steps,
                      ("config.eval.loop_steps", "config.eval.q_exit"))
