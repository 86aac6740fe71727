"""One writer per workdir (loopjax/lease.py): real lease files, real holder processes, real `loopjax train`s.

Unit level on a local disk: a lease is written with its fields and heartbeats, a live holder (another
process) refuses a second run, a kill -9'd holder's lease, an unreadable one and one whose heartbeat is
too old are taken over with a warning, and a run whose lease was taken stops with LeaseLostError. On
gs:// (the emulator of test_gcs.py) the same acquire / refuse / release, and a train refused while
another process holds the lease; the emulator ignores generation preconditions on the uploads
tensorstore sends, so a race for a gs:// lease is not tested. End to end: of two `loopjax train`s
started together on one workdir one exits 2 in one line naming the other, which logs each step once;
the run after a kill -9'd train takes its lease over and completes; two JAX processes are refused
together, and stop together (exit 3) when their lease is taken.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from etils import epath

import _train_subprocess as ts
from loopjax import config as config_lib
from loopjax import lease

try:
  from test_gcs import _bucket_run, _read_jsonl, _train, _train_argv  # the emulator's helpers
  from test_gcs import gcs  # noqa: F401 - a fixture: the emulator, one per module
except pytest.skip.Exception:  # no gcsfs or no emulator: only the gs:// tests skip
  gcs = None
needs_gcs = pytest.mark.skipif(gcs is None, reason="gs:// tests need gcsfs and fake-gcs-server (the test extra)")

HOLDER = """
import sys, time
from loopjax import lease
lease.acquire(sys.argv[1], heartbeat_seconds=float(sys.argv[2]))
print("held", flush=True)
time.sleep(600)
"""


def _holder(workdir: str, heartbeat_seconds: float = 30.0) -> subprocess.Popen:
  """Another process holding `workdir`'s lease (returns once it holds it)."""
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, workdir, str(heartbeat_seconds)], stdout=subprocess.PIPE,
                          text=True, cwd=ts.REPO)
  assert proc.stdout.readline() == "held\n", proc.wait()
  return proc


def _record(workdir) -> dict:
  return json.loads(epath.Path(workdir, lease.LEASE_FILE).read_text())


def _has_lease(workdir) -> bool:
  return epath.Path(workdir, lease.LEASE_FILE).exists()


def _wait(predicate, timeout: float = 10):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, "condition not met"
    time.sleep(0.01)


def test_acquire_writes_the_holder_heartbeats_and_release_removes_it(tmp_path):
  workdir = str(tmp_path / "run")
  held = lease.acquire(workdir, heartbeat_seconds=0.05)
  record = _record(workdir)
  assert record["pid"] == os.getpid() and record["host"] and len(record["owner"]) == 32
  assert record["started"] == record["heartbeat"] and record["command"]
  _wait(lambda: _record(workdir)["heartbeat"] > record["started"])
  assert _record(workdir)["owner"] == record["owner"] and not held.lost
  assert held.release() and os.listdir(workdir) == []


def test_a_live_holder_refuses_a_second_run_naming_it(tmp_path):
  workdir = str(tmp_path / "run")
  holder = _holder(workdir)
  try:
    with pytest.raises(lease.LeaseHeldError) as refused:
      lease.acquire(workdir)
  finally:
    holder.kill()
    holder.wait()
  message = str(refused.value)
  assert "\n" not in message and f"--workdir {workdir} is in use by another run" in message
  assert f"pid {holder.pid}, started " in message and "last heartbeat 0 s ago" in message
  assert f"kill {holder.pid} on " in message and "Fix:" in message


def test_a_kill_9_holder_is_taken_over_with_a_warning(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  holder = _holder(workdir)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with caplog.at_level(logging.WARNING, logger="loopjax"):
    held = lease.acquire(workdir)
  warning = " ".join(r.getMessage() for r in caplog.records)
  assert f"taking over the stale lease of host " in warning and f"pid {holder.pid}," in warning
  assert f"process {holder.pid} is not running" in warning
  assert _record(workdir)["pid"] == os.getpid()
  assert held.release()


def test_an_old_heartbeat_is_taken_over_and_its_holder_stops(tmp_path, caplog):
  """The first holder is alive (this process) but has not beaten for longer than the timeout."""
  workdir = str(tmp_path / "run")
  first = lease.acquire(workdir, heartbeat_seconds=3600)
  with pytest.raises(lease.LeaseHeldError):
    lease.acquire(workdir, timeout_minutes=1 / 60)
  time.sleep(1.1)
  with caplog.at_level(logging.WARNING, logger="loopjax"):
    second = lease.acquire(workdir, timeout_minutes=1 / 60)
  assert re.search(r"its last heartbeat is \d+ s old \(timeout 1 s\)", caplog.text), caplog.text
  assert not first.beat() and "now host " in first.lost
  with pytest.raises(lease.LeaseLostError) as lost:
    lease.check(first, 7)
  assert "another run took over" in str(lost.value) and "stopped after step 7 without saving" in str(lost.value)
  assert lost.value.exit_code == 3
  assert not first.release() and _record(workdir)["owner"] == second.record["owner"]
  assert second.release() and not _has_lease(workdir)


def test_the_heartbeat_thread_notices_a_lost_lease(tmp_path):
  workdir = str(tmp_path / "run")
  first = lease.acquire(workdir, heartbeat_seconds=0.05)
  lease.check(first, 1)
  os.remove(os.path.join(workdir, lease.LEASE_FILE))  # someone removed it, and another run took the workdir
  second = lease.acquire(workdir)
  _wait(lambda: first.lost)
  with pytest.raises(lease.LeaseLostError, match="stopped after step 2"):
    lease.check(first, 2)
  assert not first.release() and second.release()


def test_an_unreadable_lease_file_is_taken_over(tmp_path, caplog):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / lease.LEASE_FILE).write_text('{"host": "vm", "pid": "x"')  # e.g. cut short by hand
  with caplog.at_level(logging.WARNING, logger="loopjax"):
    held = lease.acquire(str(workdir))
  assert "taking over the stale lease of an unreadable lease.json: it is not a lease record" in caplog.text
  assert held.release()


@pytest.mark.parametrize("field,value", [("lease_heartbeat_seconds", 0.0), ("lease_timeout_minutes", -1.0),
                                         ("lease_heartbeat_seconds", 600.0)])
def test_config_checks_name_the_lease_field(field, value):
  cfg = config_lib.default_config()
  cfg.checkpoint[field] = value
  with pytest.raises(config_lib.ConfigError, match=f"config.checkpoint.{field}:"):
    config_lib.validate(cfg, 1)


def _errors(output: str, command: str = "train") -> list[str]:
  return [line for line in output.splitlines() if line.startswith(f"loopjax {command}:")]


def _one_refused(codes: list[int], errors: list[list[str]], pids: list[int]) -> int:
  """Of two runs started together, the index of the one that won the lease (the other exited 2 in one
  line at start-up, naming the winner)."""
  assert sorted(codes) == [0, 2], (codes, errors)
  winner = codes.index(0)
  [line] = errors[1 - winner]
  assert "is in use by another run: host " in line and f"pid {pids[winner]}, started " in line, line
  assert "last heartbeat " in line and "Fix:" in line
  return winner


def test_two_trains_started_together_one_is_refused_the_other_logs_each_step_once(tmp_path):
  workdir = str(tmp_path / "run")
  procs = [ts.start(workdir, "--config.train.steps=40") for _ in range(2)]  # one log file, both outputs
  try:
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  output = ts.output(workdir)
  errors = [[line for line in _errors(output) if f"pid {procs[1 - i].pid}," in line] for i in range(2)]
  _one_refused(codes, errors, [p.pid for p in procs])
  assert "Traceback" not in output and output.count("compiled the train step") == 1
  assert [r["step"] for r in ts.logged(workdir)] == list(range(1, 41))
  assert not _has_lease(workdir)


def test_a_kill_9_trains_lease_is_taken_over_by_the_next_run(tmp_path):
  """Killed as soon as it holds the lease: before its compile (whose cache entry a kill could tear)."""
  workdir = str(tmp_path / "run")
  killed = ts.start(workdir)
  ts.wait_until(lambda: _has_lease(workdir), killed)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert _record(workdir)["pid"] == killed.pid
  code, output = ts.run(workdir)
  assert code == 0, output[-3000:]
  [warning] = [line for line in output.splitlines() if "taking over the stale lease" in line]
  assert f"pid {killed.pid}, started " in warning and f"process {killed.pid} is not running" in warning
  assert [r["step"] for r in ts.logged(workdir)] == list(range(1, ts.STEPS + 1))
  assert not _has_lease(workdir)


@needs_gcs
def test_gs_acquire_refuse_and_release(gcs):  # noqa: F811
  workdir = _bucket_run("lease")
  held = lease.acquire(workdir)
  assert _record(workdir)["pid"] == os.getpid()
  with pytest.raises(lease.LeaseHeldError, match=f"--workdir {workdir} is in use by another run"):
    lease.acquire(workdir)
  assert held.release() and not _has_lease(workdir)
  lease.acquire(workdir).release()  # free again


@needs_gcs
def test_gs_train_is_refused_while_another_process_holds_the_lease(gcs, tmp_path):  # noqa: F811
  workdir = _bucket_run("lease-train")
  holder = _holder(workdir)
  try:
    result = _train(workdir, tmp_path, gcs)
  finally:
    holder.kill()
    holder.wait()
  assert result.returncode == 2, result.stderr[-3000:]
  [line] = _errors(result.stderr)
  assert f"--workdir {workdir} is in use by another run: host " in line and f"pid {holder.pid}, " in line
  assert "Traceback" not in result.stderr and "compiled" not in result.stderr


MULTIPROCESS = os.path.join(os.path.dirname(__file__), "_multiprocess_train.py")


def _two_processes(workdir: str, *overrides: str) -> list[subprocess.Popen]:
  """`loopjax train` as 2 JAX processes x 4 CPU devices (tests/_multiprocess_train.py); logs WORKDIR.pI.log."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  args = ts.command(workdir, "--config.mesh.data=8", *overrides)[2:]
  return [subprocess.Popen([sys.executable, MULTIPROCESS, str(i), "2", str(port), *args], cwd=ts.REPO,
                           stdout=open(f"{workdir}.p{i}.log", "w"), stderr=subprocess.STDOUT) for i in range(2)]


def _process_output(workdir: str, i: int) -> str:
  with open(f"{workdir}.p{i}.log") as f:
    return f.read()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_are_refused_together_with_one_line(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  holder = _holder(workdir)
  try:
    codes = [p.wait(timeout=300) for p in _two_processes(workdir)]
  finally:
    holder.kill()
    holder.wait()
  outputs = [_process_output(workdir, i) for i in range(2)]
  assert codes == [2, 2], outputs
  lines = [_errors(out) for out in outputs]
  assert lines[0] == lines[1] and len(lines[0]) == 1, lines
  assert f"pid {holder.pid}, started " in lines[0][0] and not any("compiled" in out for out in outputs)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_stop_together_when_their_lease_is_taken(tmp_path):
  """Process 0 loses the lease; both processes stop at one step with exit 3 and save nothing after it."""
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  procs = _two_processes(workdir, "--config.train.steps=100000", "--config.checkpoint.every_steps=0",
                         "--config.checkpoint.lease_heartbeat_seconds=0.2")
  try:
    ts.wait_until(lambda: ts.logged(workdir), procs[0], timeout=240)
    os.remove(os.path.join(workdir, lease.LEASE_FILE))
    taker = lease.acquire(workdir)
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
  outputs = [_process_output(workdir, i) for i in range(2)]
  assert codes == [3, 3], [out[-3000:] for out in outputs]
  lines = [_errors(out) for out in outputs]
  assert lines[0] == lines[1] and len(lines[0]) == 1, lines
  assert "another run took over this run's lease.json (now host " in lines[0][0]
  assert not os.path.exists(os.path.join(workdir, "checkpoints")) or not [
      d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert _record(workdir)["owner"] == taker.record["owner"] and taker.release()


@pytest.mark.slow
@needs_gcs
def test_gs_second_train_is_refused_and_the_first_logs_each_step_once(gcs, tmp_path):  # noqa: F811
  """Started one after the other, not together: the emulator ignores the create-only precondition, so
  two runs racing for a gs:// lease could both win there (GCS itself enforces it)."""
  workdir, steps = _bucket_run("lease-two"), ["--config.train.steps=40"]
  with open(tmp_path / "first.log", "w") as log:
    first = subprocess.Popen(_train_argv(workdir) + steps, cwd=tmp_path, env=dict(os.environ, **gcs), stdout=log,
                             stderr=subprocess.STDOUT)
  try:
    ts.wait_until(lambda: _has_lease(workdir), first, poll=0.1)
    second = _train(workdir, tmp_path, gcs, extra=steps)
    assert first.poll() is None, "the first run ended before the second one started up"
    assert second.returncode == 2, second.stderr[-3000:]
    [line] = _errors(second.stderr)
    assert f"--workdir {workdir} is in use by another run: host " in line and f"pid {first.pid}, " in line
    assert first.wait(timeout=180) == 0, (tmp_path / "first.log").read_text()[-3000:]
  finally:
    first.kill()
  assert [r["step"] for r in _read_jsonl(epath.Path(workdir) / "metrics.jsonl")] == list(range(1, 41))
  assert not _has_lease(workdir)
