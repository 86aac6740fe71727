"""One writer per workdir: `WORKDIR/lease.json` names the run that writes there; a second run is refused.

Why: two `loopjax train` on one workdir would both start, log every metrics row twice and collide at
the first checkpoint save. A run (and `loopjax import-hf`) takes the lease at start-up, before anything
compiles, and removes it when it ends, however it ends, if it is still its own.

The file holds host, pid, start time, heartbeat time, a random owner id and the command. Every write
is conditional on the generation the writer last read or wrote (tensorstore's kvstore: the same code
for a local disk and gs://), so of two runs racing for the workdir one wins and the other is refused,
and a heartbeat that finds another run's lease marks this run's lease as lost. A lease is stale, and
the next run takes it over with a warning, when its heartbeat is older than the timeout or when its
holder ran on this host and that process is gone (kill -9, a crash).

Several processes: process 0 holds the lease; its verdict reaches the others through the coordination
service (`distributed.from_process_0`), so every process fails with the same line. A lost lease stops
every process at one agreed step: process 0 asks for a preemption stop (SIGTERM to itself; JAX's sync
point picks the step) and `check` raises there, before any checkpoint is saved.
"""

import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
import uuid

import jax
import tensorstore as ts

from loopjax import distributed
from loopjax import storage

log = logging.getLogger("loopjax")

LEASE_FILE = "lease.json"


class LeaseError(RuntimeError):
  """The workdir's lease cannot be had or was lost; the message names the other run and the fix."""


class LeaseHeldError(LeaseError):
  """Another live run holds the workdir (exit 2, like any start-up error)."""


class LeaseLostError(LeaseError):
  """Another run took the workdir over while this one ran (exit 3: a fault, not a usage error)."""
  exit_code = 3  # cli/errors.EXIT_FAULT


def _now() -> float:
  return time.time()


def _utc(seconds: float) -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def describe(holder: dict, now: float | None = None) -> str:
  """'host H, pid P, started T, last heartbeat N s ago' of a lease record."""
  if not _complete(holder):
    return f"an unreadable {LEASE_FILE}"
  age = max(0.0, (_now() if now is None else now) - holder["heartbeat"])
  return (f"host {holder['host']}, pid {holder['pid']}, started {_utc(holder['started'])}, "
          f"last heartbeat {age:.0f} s ago")


def _complete(holder: dict) -> bool:
  """Whether a lease record has the fields staleness needs (an older or damaged file may not)."""
  types = {"host": str, "pid": int, "started": (int, float), "heartbeat": (int, float)}
  return all(isinstance(holder.get(k), t) for k, t in types.items())


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def stale_reason(holder: dict, timeout_seconds: float, now: float | None = None) -> str | None:
  """Why the lease `holder` may be taken over, or None while its run is alive.

  The pid is only checked on the holder's own host. (Two containers sharing a hostname but not a pid
  namespace would see each other as gone; the run taken over then stops at its next heartbeat.)
  """
  if not _complete(holder):
    return "it is not a lease record"
  age = (_now() if now is None else now) - holder["heartbeat"]
  if age > timeout_seconds:
    return f"its last heartbeat is {age:.0f} s old (timeout {timeout_seconds:g} s)"
  if holder["host"] == socket.gethostname() and not _alive(holder["pid"]):
    return f"process {holder['pid']} is not running on {holder['host']}"
  return None


def _open(workdir) -> ts.KvStore:
  return ts.KvStore.open(storage.kvstore_url(workdir)).result()


def _read(kv: ts.KvStore) -> tuple[dict | None, bytes]:
  """(the lease record or None when there is none, its generation: b'\\x02' when missing)."""
  result = kv.read(LEASE_FILE).result()
  if result.state != "value":
    return None, result.stamp.generation
  try:
    holder = json.loads(result.value)
  except ValueError:
    holder = {}
  return holder if isinstance(holder, dict) else {}, result.stamp.generation


def _encode(record: dict) -> bytes:
  return json.dumps(record, indent=1).encode()


def _new_record() -> dict:
  now = _now()
  return {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
          "owner": uuid.uuid4().hex, "command": shlex.join(sys.argv)}


def held_message(workdir, holder: dict, timeout_minutes: float) -> str:
  return (f"--workdir {workdir} is in use by another run: {describe(holder)} ({LEASE_FILE}). Fix: wait for "
          f"that run to end, stop it (kill {holder['pid']} on {holder['host']}) or use another --workdir; a lease "
          "whose process is gone, or whose heartbeat is older than checkpoint.lease_timeout_minutes="
          f"{timeout_minutes:g}, is taken over by the next run")


class Lease:
  """A lease this process holds: a daemon thread rewrites its heartbeat every `heartbeat_seconds`.

  A heartbeat is a write conditional on the generation last written; when it fails, another run has
  the workdir and `lost` says which. `release()` stops the thread and deletes the file if still ours.
  """

  def __init__(self, kv: ts.KvStore, workdir, record: dict, generation: bytes, heartbeat_seconds: float):
    self._kv, self.workdir, self.record, self.generation = kv, workdir, record, generation
    self.heartbeat_seconds, self.lost = heartbeat_seconds, ""
    self._stop, self._lock = threading.Event(), threading.Lock()
    self._thread = threading.Thread(target=self._beat_until_stopped, name="loopjax-lease", daemon=True)

  def start(self) -> "Lease":
    self._thread.start()
    return self

  def _beat_until_stopped(self):
    while not self._stop.wait(self.heartbeat_seconds):
      if not self.beat():
        if jax.process_count() > 1:  # every process stops at one step: JAX's preemption sync point
          os.kill(os.getpid(), signal.SIGTERM)
        return

  def beat(self) -> bool:
    """One heartbeat; False once the lease is another run's (then `lost` names it)."""
    with self._lock:
      if self.lost or self._stop.is_set():
        return not self.lost
      record = dict(self.record, heartbeat=_now())
      try:
        generation = self._kv.write(LEASE_FILE, _encode(record), if_equal=self.generation).result().generation
      except Exception as e:  # noqa: BLE001 - a storage hiccup: the next heartbeat tries again
        log.warning("lease heartbeat in %s failed (%s); retrying in %g s", self.workdir, e, self.heartbeat_seconds)
        return True
      if generation:
        self.record, self.generation = record, generation
        return True
      holder, _ = _read(self._kv)
      self.lost = f"now {describe(holder)}" if holder is not None else f"{LEASE_FILE} was removed"
      log.warning("--workdir %s: another run took over this run's lease (%s); stopping at the next step",
                  self.workdir, self.lost)
      return False

  def release(self) -> bool:
    """Stops the heartbeat and deletes the lease file if it is still this run's; whether it was."""
    self._stop.set()
    if self._thread.is_alive() and self._thread is not threading.current_thread():
      self._thread.join()
    with self._lock:
      if self.lost:
        return False
      try:
        return bool(self._kv.write(LEASE_FILE, None, if_equal=self.generation).result().generation)
      except Exception as e:  # noqa: BLE001 - the run's outcome matters more; the lease goes stale
        log.warning("could not remove %s from %s (%s); the next run takes it over once stale", LEASE_FILE,
                    self.workdir, e)
        return False


def acquire(workdir, heartbeat_seconds: float = 30.0, timeout_minutes: float = 10.0) -> Lease:
  """Takes `workdir`'s lease (creates it, or takes over a stale one with a warning) and starts its
  heartbeat; raises LeaseHeldError naming the holder while another live run has it.

  On the fake-gcs-server emulator a race cannot be tested: it ignores ifGenerationMatch on the simple
  uploads tensorstore sends, so there both racers' writes succeed. What the gs:// tests check is this
  read-then-check of a live holder; the conditional write is what GCS itself enforces.
  """
  try:
    kv = _open(workdir)
    for _ in range(3):  # a lost race re-reads: the winner is then a live holder
      holder, generation = _read(kv)
      reason = None if holder is None else stale_reason(holder, timeout_minutes * 60)
      if holder is not None and reason is None:
        raise LeaseHeldError(held_message(workdir, holder, timeout_minutes))
      record = _new_record()
      written = kv.write(LEASE_FILE, _encode(record), if_equal=generation).result().generation
      if written:
        if holder is not None:
          log.warning("--workdir %s: taking over the stale lease of %s: %s", workdir, describe(holder), reason)
        return Lease(kv, workdir, record, written, heartbeat_seconds).start()
  except LeaseError:
    raise
  except Exception as e:  # noqa: BLE001 - tensorstore reports every storage failure as ValueError
    raise LeaseError(f"--workdir {workdir}: cannot write its {LEASE_FILE} ({' '.join(str(e).split())[:300]}). "
                     "Fix: use a directory (or bucket) this run may create and write") from None
  raise LeaseHeldError(f"--workdir {workdir}: other runs keep taking its {LEASE_FILE}. Fix: run one "
                       "`loopjax train` per workdir")


def _acquire_on_process_0(workdir, checkpoint_cfg) -> Lease | None:
  """Process 0 takes the lease; every process raises the same LeaseError if it could not."""
  if jax.process_index() == 0:
    try:
      lease = acquire(workdir, checkpoint_cfg.lease_heartbeat_seconds, checkpoint_cfg.lease_timeout_minutes)
    except Exception as e:
      distributed.from_process_0("lease", f"{type(e).__name__}: {e}")  # the others raise it too
      raise
    distributed.from_process_0("lease", "")
    return lease
  failure = distributed.from_process_0("lease", "")
  if failure:
    kind, _, message = failure.partition(": ")
    errors = {cls.__name__: cls for cls in (LeaseHeldError, LeaseError)}
    raise errors[kind](message) if kind in errors else LeaseError(
        f"--workdir {workdir}: process 0 could not take the {LEASE_FILE}: {failure}")
  return None


@contextlib.contextmanager
def held(workdir, checkpoint_cfg):
  """Process 0 holds `workdir`'s lease for the block (released however the block ends); every process
  raises the same LeaseHeldError when it is another run's. Yields the Lease (None on other processes)."""
  lease = _acquire_on_process_0(workdir, checkpoint_cfg)
  try:
    yield lease
  finally:
    if lease is not None:
      lease.release()


def check(lease: Lease | None, step: int):
  """Raises LeaseLostError (on every process alike) once another run took the lease over. With several
  processes, call it at a step they all reach (it passes process 0's verdict to the others)."""
  message = ""
  if lease is not None and lease.lost:
    message = (f"--workdir {lease.workdir}: another run took over this run's {LEASE_FILE} ({lease.lost}); this "
               f"run stopped after step {step} without saving. Fix: let that run have the workdir, or stop it "
               "and run this one again (it resumes from the newest checkpoint)")
  if jax.process_count() > 1:
    message = distributed.from_process_0("lease_lost", message)
  if message:
    raise LeaseLostError(message)
