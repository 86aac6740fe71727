"""Experiment trackers beside metrics.jsonl: Weights & Biases and MLflow (`train.trackers`).

Why: a run of weeks is watched from a dashboard, and W&B is the default tracker of Levanter, MaxText and
torchtitan; MLflow is the common self-hosted one. metrics.jsonl stays the record (always written, resume
trims it exactly); a tracker gets the same rows, each scalar under its name and each per-loop-step list
as a series `name/1`..`name/T` (as TensorBoard gets them).

Each tracker logs the resolved config and the phase plan once, when its run is created. A resume continues
the same tracker run: its id is kept in WORKDIR/trackers.json. Rows a tracker already holds (the steps a
killed run logged after its last checkpoint, which an exact resume computes again, equal) are not sent
twice: W&B (online) reports the next step it expects, MLflow the newest step of `loss`.

A tracker that fails during the run (its server unreachable) is dropped with one warning; the run goes on
and metrics.jsonl holds everything. Only process 0 tracks.
"""

import json
import logging
import os
import tempfile
import time

from loopjax import config_longrun
from loopjax import storage

log = logging.getLogger("loopjax")

STATE_FILE = "trackers.json"


def flat(metrics: dict) -> dict:
  """Scalars by name; a list (one value per loop step) as name/1..name/T; strings and None left out."""
  out = {}
  for key, value in metrics.items():
    if isinstance(value, list):
      out.update({f"{key}/{i + 1}": float(v) for i, v in enumerate(value) if isinstance(v, (int, float))})
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[key] = float(value)
  return out


def _flat_config(values: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in values.items():
    if isinstance(value, dict):
      out.update(_flat_config(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


class TrackerError(RuntimeError):
  """A tracker that cannot start (no credentials, an unreachable server); names the tracker and the fix."""
  exit_code = 2  # refused at start-up (loopjax/cli/errors.py)


class _State:
  """WORKDIR/trackers.json: each tracker's run id, so a resume continues the same run."""

  def __init__(self, workdir: str):
    self.path = storage.run_path(workdir) / STATE_FILE
    self.values = json.loads(self.path.read_text()) if self.path.exists() else {}

  def save(self, name: str, value: dict):
    self.values[name] = value
    self.path.write_text(json.dumps(self.values, indent=1) + "\n")


class WandbTracker:
  def __init__(self, run_info: dict, state: _State):
    import wandb
    saved = state.values.get("wandb", {})
    workdir = run_info["workdir"]
    directory = tempfile.mkdtemp(prefix="loopjax-wandb-") if storage.is_remote(workdir) else workdir
    # console="off": W&B would otherwise wrap stdout/stderr, under the progress bar and the watchdog's dump.
    self.run = wandb.init(project=run_info["project"], name=run_info["name"], id=saved.get("id"), resume="allow",
                          dir=directory, settings=wandb.Settings(console="off", quiet=True),
                          config=None if saved else {"config": run_info["config"], "plan": run_info["plan"]})
    state.save("wandb", {"id": self.run.id, "project": run_info["project"]})
    self.next_step = self.run.step if self.run.resumed else 0  # W&B refuses steps below the one it holds
    self.where = f"run {self.run.id}" + (f" at {self.run.url}" if self.run.url else f" (offline, in {self.run.dir})")

  def write(self, step: int, row: dict):
    if step >= self.next_step:
      self.run.log(row, step=step)

  def close(self):
    self.run.finish()


class MlflowTracker:
  def __init__(self, run_info: dict, state: _State):
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient
    workdir = run_info["workdir"]
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:  # MLflow keeps its file store only when asked: this is the store a run owns, in its workdir
      os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
      uri = (storage.run_path(workdir) / "mlruns").as_uri()
    self.client = MlflowClient(tracking_uri=uri)
    saved = state.values.get("mlflow", {})
    self.last_step = -1
    if saved.get("tracking_uri") == uri:
      self.run_id = saved["run_id"]
      self.client.update_run(self.run_id, status="RUNNING")
      self.last_step = max((m.step for m in self.client.get_metric_history(self.run_id, "loss")), default=-1)
    else:
      experiment = self.client.get_experiment_by_name(run_info["project"])
      experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(run_info["project"])
      self.run_id = self.client.create_run(experiment_id, run_name=run_info["name"]).info.run_id
      params = [Param(k, str(v)[:6000]) for k, v in _flat_config(run_info["config"]).items()]
      for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        self.client.log_batch(self.run_id, params=params[i:i + 100])
      self.client.log_dict(self.run_id, run_info["config"], "config.json")
      self.client.log_dict(self.run_id, {"phases": run_info["plan"]}, "plan.json")
    state.save("mlflow", {"run_id": self.run_id, "tracking_uri": uri})
    self.where = f"run {self.run_id} at {uri}"

  def write(self, step: int, row: dict):
    from mlflow.entities import Metric
    if step > self.last_step:
      now = int(time.time() * 1000)
      self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in row.items()])

  def close(self):
    self.client.set_terminated(self.run_id)


TRACKER_CLASSES = {"wandb": WandbTracker, "mlflow": MlflowTracker}
FIXES = {"wandb": "log in (`wandb login` or WANDB_API_KEY) or run offline with WANDB_MODE=offline",
         "mlflow": "check MLFLOW_TRACKING_URI (unset: a file store in WORKDIR/mlruns)"}


class Trackers:
  """The run's external trackers, fed one metrics row at a time; each failure drops that tracker only."""

  def __init__(self, train_cfg, run_info: dict):
    self.live = {}
    names = [n for n in config_longrun.trackers(train_cfg) if n in TRACKER_CLASSES]
    state = _State(run_info["workdir"]) if names else None
    for name in names:
      try:
        self.live[name] = TRACKER_CLASSES[name](run_info, state)
      except Exception as error:  # noqa: BLE001 - each library has its own; all mean the tracker cannot start
        self.close()
        raise TrackerError(f"config.train.trackers: {name} could not start its run ({type(error).__name__}: "
                           f"{' '.join(str(error).split())[:300]}). Fix: {FIXES[name]}, or drop {name} from "
                           "train.trackers") from error
      log.info("tracking to %s: %s", name, self.live[name].where)

  def write(self, step: int, metrics: dict):
    row = flat(metrics)
    for name, tracker in list(self.live.items()):
      self._guarded(name, tracker.write, step, row)

  def close(self):
    for name, tracker in list(self.live.items()):
      self._guarded(name, tracker.close)

  def _guarded(self, name: str, fn, *args):
    try:
      fn(*args)
    except Exception as error:  # noqa: BLE001 - a tracker's outage must not end a run that metrics.jsonl records
      log.warning("tracker %s failed (%s: %s); it is dropped for the rest of this run, metrics.jsonl goes on",
                  name, type(error).__name__, error)
      self.live.pop(name, None)


def run_info(cfg, workdir: str, plan) -> dict:
  """What a tracker run is created with: names, the resolved config and the phase plan."""
  t = cfg.train
  phases = [{"phase": ph.spec.name, "start_step": ph.start, "end_step": ph.end, "tokens": ph.tokens,
             "loop_steps": ph.segments[0].cfg.model.loop_steps, "seq_len": ph.segments[0].cfg.train.seq_len,
             "batch_size": [s.cfg.train.batch_size for s in ph.segments], "layers": ph.segments[0].cfg.model.num_layers,
             "objective": ph.spec.objective} for ph in plan]
  name = t.tracker_run_name or os.path.basename(os.fspath(storage.run_path(workdir)).rstrip("/"))
  return {"workdir": workdir, "project": t.tracker_project, "name": name, "config": json.loads(cfg.to_json()),
          "plan": phases}
