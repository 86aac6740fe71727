"""Run `loopjax train` on the tiny config in real subprocesses, and read back what they logged.

Each run takes a few seconds (one CPU device, the persistent compile cache shared by all runs).
"""

import json
import os
import subprocess
import sys
import time

from conftest import SUBPROCESS_CACHE

LOOPJAX = os.path.join(os.path.dirname(sys.executable), "loopjax")
STEPS = 12
TINY = ["--config", "configs/smoke.py", f"--config.train.steps={STEPS}", "--config.train.seq_len=64",
        "--config.train.log_every=1", "--config.train.progress=False", "--config.optim.warmup_steps=2",
        "--config.optim.decay_steps=4", "--config.checkpoint.every_steps=4", "--config.checkpoint.keep=5",
        f"--compile_cache={SUBPROCESS_CACHE}"]
# The output a user of the plain install (no libtpu) sees: the test extra's libtpu prints its own start-up
# lines on a machine without a TPU, which the tests that count output lines must not count.
WITHOUT_TPU = {"JAX_PLATFORMS": "cpu"}
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def command(workdir: str, *overrides: str) -> list[str]:
  return [LOOPJAX, "train", *TINY, f"--workdir={workdir}", *overrides]


def start(workdir: str, *overrides: str, env: dict | None = None) -> subprocess.Popen:
  """A training subprocess; its output goes to WORKDIR/../<name>.log (read it with `output`)."""
  os.makedirs(workdir, exist_ok=True)
  log = open(_log_path(workdir), "a")
  return subprocess.Popen(command(workdir, *overrides), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          env=dict(os.environ, **(env or {})))


def run(workdir: str, *overrides: str, timeout: float = 180, env: dict | None = None) -> tuple[int, str]:
  """(exit code, output) of a training run to completion."""
  proc = start(workdir, *overrides, env=env)
  code = proc.wait(timeout=timeout)
  return code, output(workdir)


def _log_path(workdir: str) -> str:
  return os.path.normpath(workdir) + ".log"


def output(workdir: str) -> str:
  with open(_log_path(workdir)) as f:
    return f.read()


def logged(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def losses(workdir: str) -> list[tuple[int, float]]:
  return [(r["step"], r["loss"]) for r in logged(workdir)]


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 120, poll: float = 0.002):
  """Polls `predicate()` until true; fails if the process ends first or time runs out."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"the training process exited ({proc.returncode}) before the condition held")
    time.sleep(poll)
  raise AssertionError(f"condition not met within {timeout} s")
