"""Multi-process start-up: real `loopjax train` processes on localhost through `launch/local.sh`.

The runs are the smoke model for 8 steps. `launch/local.sh 2 4` (2 processes x 4 fake CPU devices)
and `launch/local.sh 1 8` (1 x 8) build the same (8, 1, 1) mesh, so with the same global batches
their losses agree to float rounding: 1e-5 relative (the collectives reduce in a different order).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import SUBPROCESS_CACHE
from loopjax import distributed

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.dirname(sys.executable)
LOOPJAX = os.path.join(BIN, "loopjax")
LOCAL_SH = os.path.join(REPO, "launch", "local.sh")
STEPS = 8
RTOL = 1e-5
TINY = ["--config", "configs/smoke.py", f"--config.train.steps={STEPS}", "--config.train.seq_len=64",
        "--config.train.log_every=1", "--config.train.progress=False", "--config.optim.schedule=constant",
        "--config.checkpoint.every_steps=0", "--config.checkpoint.every_minutes=0",
        f"--compile_cache={SUBPROCESS_CACHE}"]
ENV = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), PYTHON=sys.executable,
           JAX_PLATFORMS="cpu")
for _name in ("COORDINATOR", "NUM_PROCESSES", "PROCESS_ID", "LOCAL_DEVICES", "INITIALIZATION_TIMEOUT"):
  ENV.pop(distributed.ENV_PREFIX + _name, None)


class LossesDiffer(AssertionError):
  """1 x 8 and 2 x 4 runs logged different losses."""


class NotResumed(AssertionError):
  """A run on another process count did not resume from the checkpoint it was given."""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _local(runs: list[tuple[int, int, str, list[str]]], timeout: float = 300) -> list[tuple[int, str]]:
  """Starts `launch/local.sh PROCESSES DEVICES -- loopjax train ... --workdir=W` for each run at once
  (compiles are mostly single-threaded, so two runs use both cores); (exit code, output) of each."""
  procs = [subprocess.Popen([LOCAL_SH, str(processes), str(devices), "--", LOOPJAX, "train", *TINY,
                             f"--workdir={workdir}", *overrides],
                            cwd=REPO, env=dict(ENV, LOOPJAX_LOG_DIR=workdir + ".logs"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for processes, devices, workdir, overrides in runs]
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  return [(p.returncode, out) for p, out in zip(procs, outputs)]


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _assert_close(a: dict, b: dict, steps):
  for step in steps:
    if abs(a[step] - b[step]) > RTOL * abs(b[step]):
      raise LossesDiffer(f"step {step}: {a[step]} vs {b[step]} (all: {a} vs {b})")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs of an 8-step run as 2 processes x 4 devices and as 1 process x 8 devices."""
  root = tmp_path_factory.mktemp("distributed")
  workdirs = {processes: str(root / f"p{processes}") for processes in (2, 1)}
  results = _local([(2, 4, workdirs[2], []), (1, 8, workdirs[1], [])])
  for code, output in results:
    assert code == 0, output[-4000:]
  return workdirs


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_match_one_process(runs):
  two, one = _losses(runs[2]), _losses(runs[1])
  assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
  _assert_close(two, one, range(1, STEPS + 1))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_only_process_zero_reports_progress(runs):
  """Both processes log (each line names its process); only process 0 prints the closing summary."""
  logs = [open(os.path.join(runs[2] + ".logs", f"process_{i}.log")).read() for i in range(2)]
  for i, log in enumerate(logs):
    assert f"[process {i}/2]" in log and f"process {i} of 2 (explicit start-up), 4 local / 8 global" in log
  assert "finished at step" in logs[0] and "finished at step" not in logs[1]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_checkpoint_moves_between_process_counts(runs, tmp_path):
  """The 8-step checkpoint of each run continues to 12 steps on the other process count."""
  workdirs = {source: str(tmp_path / f"from{source}") for source in (2, 1)}
  for source, workdir in workdirs.items():
    shutil.copytree(runs[source], workdir)
  longer = [f"--config.train.steps={STEPS + 4}"]
  results = _local([(1, 8, workdirs[2], longer), (2, 4, workdirs[1], longer)])
  for code, output in results:
    assert code == 0, output[-4000:]
    if f"resumed from checkpoint step {STEPS}" not in output:
      raise NotResumed(output[-4000:])
  moved = {source: _losses(workdir) for source, workdir in workdirs.items()}
  for losses in moved.values():
    assert sorted(losses) == list(range(1, STEPS + 5))
  _assert_close(moved[2], moved[1], range(STEPS + 1, STEPS + 5))


def test_unreachable_coordinator_fails_fast_with_the_address():
  """Process 1 pointed at a port where nothing listens, and process 0 whose peer never comes:
  both exit with EXIT_CANNOT_JOIN well within the bound, naming the address, what they found, the fix."""
  timeout, bound = 5, 60
  dead, lonely = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen([LOOPJAX, "train", *TINY, "--workdir=/nonexistent/never-used"],
                            env=dict(ENV, LOOPJAX_COORDINATOR=address, LOOPJAX_NUM_PROCESSES="2",
                                     LOOPJAX_PROCESS_ID=str(pid), LOOPJAX_INITIALIZATION_TIMEOUT=str(timeout)),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for address, pid in ((dead, 1), (lonely, 0))]
  start = time.monotonic()
  outputs = [p.communicate(timeout=bound)[0] for p in procs]
  assert time.monotonic() - start < bound
  for p, out, address in zip(procs, outputs, (dead, lonely)):
    assert p.returncode == distributed.EXIT_CANNOT_JOIN, out[-3000:]
    assert f"at coordinator {address} within {timeout} s" in out and "Fix:" in out, out[-3000:]
  assert f"nothing accepts connections at {dead}" in outputs[0]
  assert "the coordinator runs but not every process joined" in outputs[1]


@pytest.mark.parametrize("env, message", [
    ({"LOOPJAX_COORDINATOR": "10.0.0.2:8476"}, "missing num_processes, process_id"),
    ({"LOOPJAX_COORDINATOR": "10.0.0.2", "LOOPJAX_NUM_PROCESSES": "2", "LOOPJAX_PROCESS_ID": "0"},
     "is not host:port"),
    ({"LOOPJAX_COORDINATOR": "h:1", "LOOPJAX_NUM_PROCESSES": "2", "LOOPJAX_PROCESS_ID": "2"},
     "0 <= process_id < num_processes"),
    ({"LOOPJAX_NUM_PROCESSES": "two"}, "LOOPJAX_NUM_PROCESSES='two' is not a valid int"),
])
def test_inconsistent_settings_name_the_setting_and_fix(env, message):
  with pytest.raises(distributed.DistributedError, match="Fix:") as e:
    distributed.initialize(distributed.settings_from(environ=env))
  assert message in str(e.value)


def test_flags_override_environment():
  class Flags:
    coordinator, num_processes, process_id, local_devices, initialization_timeout = "a:1", 4, None, None, None
  s = distributed.settings_from(Flags, environ={"LOOPJAX_PROCESS_ID": "3", "LOOPJAX_NUM_PROCESSES": "9"})
  assert s == distributed.Settings(coordinator="a:1", num_processes=4, process_id=3)
