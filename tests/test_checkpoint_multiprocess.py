"""Two JAX processes on localhost (4 CPU devices each, one (2, 2, 2) mesh) save a globally sharded
state, are preempted by SIGTERM to one of them, restart and continue with the uninterrupted losses."""

import os
import signal
import socket
import subprocess
import sys

import pytest

import _train_subprocess as ts

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
SCRIPT = os.path.join(os.path.dirname(__file__), "_multiprocess_train.py")
MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
        "--config.checkpoint.every_steps=0", "--config.checkpoint.every_minutes=0"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir: str) -> list[subprocess.Popen]:
  port = _free_port()
  procs = []
  for i in range(2):
    log = open(f"{workdir}.p{i}.log", "a")
    args = ts.command(workdir, *MESH)[2:]
    procs.append(subprocess.Popen([sys.executable, SCRIPT, str(i), "2", str(port), *args], cwd=ts.REPO,
                                  stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait(procs, timeout=300) -> list[int]:
  return [p.wait(timeout=timeout) for p in procs]


def _out(workdir, i):
  with open(f"{workdir}.p{i}.log") as f:
    return f.read()


def test_two_processes_preempted_resume_with_identical_losses(tmp_path):
  reference = str(tmp_path / "reference")
  os.makedirs(reference)
  assert _wait(_start(reference)) == [0, 0], _out(reference, 0)[-3000:] + _out(reference, 1)[-3000:]
  assert [s for s, _ in ts.losses(reference)] == list(range(1, ts.STEPS + 1))

  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  procs = _start(workdir)
  ts.wait_until(lambda: len(ts.logged(workdir)) >= 3, procs[0], timeout=240)
  procs[1].send_signal(signal.SIGTERM)  # only one process is told; JAX's sync point tells the other
  assert _wait(procs) == [75, 75], _out(workdir, 0)[-3000:] + _out(workdir, 1)[-3000:]
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert len(saved) == 1 and saved[0] < ts.STEPS, saved
  for i in range(2):
    assert f"preempted: saved step {saved[0]}" in _out(workdir, i)

  assert _wait(_start(workdir)) == [0, 0], _out(workdir, 0)[-3000:]
  for i in range(2):
    assert f"resumed from checkpoint step {saved[0]}" in _out(workdir, i)
  assert ts.losses(workdir) == ts.losses(reference)
