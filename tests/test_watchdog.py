"""The hang watchdog (loopjax/train/watchdog.py): a process whose steps stop finishing exits 76 with every
thread's stack; work it is told about gets the allowance; and a real two-process run whose peer is frozen
(SIGSTOP: a stuck host) ends that way instead of waiting forever."""

import os
import re
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

import _train_subprocess as ts
from loopjax.cli.errors import EXIT_HUNG
from loopjax.train import watchdog as watchdog_lib

# Three steps finish, `busy` work outlasts the step limit, then the main thread blocks for good.
STUCK = """
import sys, time
import jax.numpy as jnp
from loopjax.train.watchdog import Watchdog
dog = Watchdog(float(sys.argv[1]), on_expiry=lambda: print("released the lease", flush=True)).start()
dog.segment_started()
for step in range(1, 4):
  dog.dispatched(step, jnp.ones(2) * step)
  time.sleep(0.1)
with dog.busy("compiling the train step"):
  time.sleep(2 * float(sys.argv[1]))
print("the allowance held", flush=True)
def blocked_in_a_collective():
  time.sleep(120)
blocked_in_a_collective()
"""


def test_a_hung_process_exits_76_naming_the_step_with_every_threads_stack():
  began = time.monotonic()
  proc = subprocess.run([sys.executable, "-c", STUCK, "1.5"], capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  seconds = time.monotonic() - began
  assert proc.returncode == EXIT_HUNG == 76, proc.stderr
  assert "the allowance held" in proc.stdout and "released the lease" in proc.stdout
  first = proc.stderr[proc.stderr.index("loopjax train: hung"):].splitlines()[0]
  assert re.search(r"waited \d+ s for step 4 to finish \(step 3 was the last\) \(train.step_timeout: 1.5 s\)", first)
  assert "Exit 76: run the same command again" in first
  assert "blocked_in_a_collective" in proc.stderr and 'Thread 0x' in proc.stderr  # faulthandler's dump
  assert seconds < 30


def test_the_automatic_limit_follows_the_median_step_after_a_few_steps():
  dog = watchdog_lib.Watchdog(0.0)
  dog.segment_started()
  assert dog.limit() == watchdog_lib.ALLOWANCE_SECONDS  # before AUTO_SAMPLES steps have finished
  start = dog._progress_at
  for i in range(1, watchdog_lib.AUTO_SAMPLES + 1):
    dog.dispatched(i, jnp.ones(1))
    dog._poll(start + 40.0 * i)  # one step every 40 s
  with dog._lock:
    assert dog.limit() == watchdog_lib.AUTO_FACTOR * 40.0
  with dog.busy("saving a checkpoint"), dog._lock:
    assert dog.limit() == watchdog_lib.ALLOWANCE_SECONDS
  fixed = watchdog_lib.Watchdog(7.0)
  fixed.segment_started()
  assert fixed.limit() == 7.0
  assert watchdog_lib.Watchdog(float("inf")).start()._thread is None  # inf: off


def _child_with(parent: int, key: str, value: str) -> int:
  """The pid of `parent`'s child process whose environment has key=value."""
  for pid in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
    try:
      env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
      continue
    if f"{key}={value}".encode() in env:
      return int(pid)
  raise AssertionError(f"no child of {parent} with {key}={value}")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_frozen_peer_hangs_the_collective_and_the_watchdog_ends_the_run_with_76(tmp_path):
  workdir = str(tmp_path / "run")
  logs = str(tmp_path / "logs")
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
             PYTHON=sys.executable, LOOPJAX_LOG_DIR=logs, JAX_PLATFORMS="cpu")
  argv = [os.path.join(ts.REPO, "launch", "local.sh"), "2", "4", "--", *ts.command(workdir),
          "--config.train.steps=100000", "--config.train.step_timeout=10", "--config.checkpoint.every_steps=0"]
  proc = subprocess.Popen(argv, cwd=ts.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  try:
    ts.wait_until(lambda: len(ts.logged(workdir)) >= 3, proc, timeout=240)
    frozen = _child_with(proc.pid, "LOOPJAX_PROCESS_ID", "1")
    os.kill(frozen, signal.SIGSTOP)
    stopped = time.monotonic()
    output, _ = proc.communicate(timeout=120)
    waited = time.monotonic() - stopped
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 76, output[-3000:]
  log = open(os.path.join(logs, "process_0.log")).read()
  assert "loopjax train: hung: waited 1" in log and "(train.step_timeout: 10 s)" in log
  assert "Current thread" in log or "Thread 0x" in log
  assert waited < 60  # 10 s of silence, a poll, then local.sh stops the frozen peer (SIGKILL after 10 s)
  assert not os.path.exists(os.path.join(workdir, "lease.json"))  # released: the rerun is not refused
