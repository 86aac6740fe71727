"""Trackers (loopjax/train/trackers.py) for real: W&B in offline mode and MLflow's local file store get the
rows metrics.jsonl holds, and a preempted run's resume continues the same tracker runs."""

import glob
import json
import os
import signal
import struct
import subprocess
import sys

import pytest

import _train_subprocess as ts

STEPS = 20
ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "JAX_PLATFORMS": "cpu"}


def wandb_records(path: str):
  """The records of a W&B transaction log (run-<id>.wandb): LevelDB-style 32 KiB blocks of CRC-framed
  chunks after a 7-byte header, each record a `wandb_internal_pb2.Record`."""
  from wandb.proto import wandb_internal_pb2
  data, block = open(path, "rb").read(), 32768
  assert data[:4] == b":W&B", path
  pos, pending = 7, b""
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # the rest of a block too short for a header is padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0 and length == 0:
      pos += block - pos % block
      continue
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # a whole record, or the last chunk of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b""
      yield record


def wandb_runs(workdir: str) -> list[dict]:
  """Each offline run (one per process start): its id, config keys and history rows by step."""
  runs = []
  for path in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))):
    run = {"id": None, "config": set(), "rows": {}}
    for record in wandb_records(path):
      kind = record.WhichOneof("record_type")
      if kind == "run":
        run["id"] = record.run.run_id
        run["config"] |= {item.key for item in record.run.config.update}
      elif kind == "history":
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        run["rows"][row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    runs.append(run)
  return runs


def expected(rows: list[dict]) -> dict:
  from loopjax.train.trackers import flat
  return {r["step"]: flat({k: v for k, v in r.items() if k != "step"}) for r in rows}


@pytest.mark.slow
def test_wandb_and_mlflow_hold_the_jsonl_rows_and_a_resume_continues_their_runs(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  overrides = [f"--config.train.steps={STEPS}", "--config.train.trackers=tensorboard,wandb,mlflow",
               "--config.train.tracker_project=tests"]
  env = dict(ENV)
  monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: a file store in the workdir
  monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's own reading client
  proc = ts.start(workdir, *overrides, env=env)
  ts.wait_until(lambda: len(ts.logged(workdir)) >= 8, proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 75, ts.output(workdir)[-3000:]
  code, output = ts.run(workdir, *overrides, env=env)
  assert code == 0, output[-3000:]
  assert "tracking to wandb" in output and "tracking to mlflow" in output
  rows = expected(ts.logged(workdir))
  assert sorted(rows) == list(range(1, STEPS + 1))

  runs = wandb_runs(workdir)
  assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]  # the resume continued the same W&B run
  assert {"config", "plan"} <= runs[0]["config"]  # the resolved config and the phase plan, once
  history = {**runs[0]["rows"], **runs[1]["rows"]}
  assert not set(runs[0]["rows"]) & set(runs[1]["rows"])  # no step twice
  assert history == rows

  from mlflow.tracking import MlflowClient
  state = json.load(open(os.path.join(workdir, "trackers.json")))
  client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
  run = client.get_run(state["mlflow"]["run_id"])
  assert run.info.status == "FINISHED" and run.data.params["train.steps"] == str(STEPS)
  assert len(client.search_runs([run.info.experiment_id])) == 1  # the resume continued the same MLflow run
  artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
  assert {"config.json", "plan.json"} <= artifacts
  for key in ("loss", "grad_norm", "ce_per_step/1", "exit_probs/4", "lr"):
    points = client.get_metric_history(run.info.run_id, key)
    assert sorted((p.step, p.value) for p in points) == [(s, rows[s][key]) for s in range(1, STEPS + 1)], key


# An import hook that hides a package, as if it were not installed.
HIDDEN = """
import sys
class Hide:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == {package!r}:
      raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Hide())
from loopjax.cli import main
sys.argv = ["loopjax", "train", "--config", "configs/smoke.py", "--workdir", {workdir!r},
            "--config.train.trackers=tensorboard,{package}"]
main()
"""


def test_a_tracker_without_its_package_is_one_line_naming_the_extra(tmp_path):
  """Run without JAX_PLATFORMS: the error is the only line besides loopjax's start-up line, so the
  test extra's libtpu prints nothing either on this machine without a TPU."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  script = HIDDEN.format(package="mlflow", workdir=str(tmp_path / "run"))
  proc = subprocess.run([sys.executable, "-c", script], cwd=ts.REPO, capture_output=True, text=True, timeout=120,
                        env=env)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines[-1] == ("loopjax train: config.train.trackers: mlflow needs the mlflow package, which is not "
                       "installed. Fix: pip install 'loopjax[mlflow]', or drop mlflow from train.trackers.")
  assert all(line.startswith("loopjax") for line in lines), proc.stderr  # no libtpu start-up lines
