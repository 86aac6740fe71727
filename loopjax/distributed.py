"""Process start-up for multi-controller runs: one JAX process per host, joined before the backend starts.

`initialize` must run before anything touches a JAX backend (device lists, arrays, compiles), because
the backend of every process is built from the distributed runtime's view of all hosts. It picks,
in this order:

  1. explicit settings: --coordinator/--num_processes/--process_id, or the environment variables
     LOOPJAX_COORDINATOR, LOOPJAX_NUM_PROCESSES, LOOPJAX_PROCESS_ID (what launch/*.sh set);
  2. a cluster JAX detects by itself: a Cloud TPU pod (GCE or GKE), a SLURM step (srun), Open MPI;
  3. otherwise a single process.

LOOPJAX_LOCAL_DEVICES / --local_devices gives each process that many fake CPU devices
(`jax_num_cpu_devices`), so several processes on one machine form a real multi-host mesh.

JAX's own connect step aborts the process from C++ with a bare DEADLINE_EXCEEDED (and a hint that
"another task died") when the coordinator never answers. A watchdog thread fires just before that
and exits with a message naming the coordinator address, what it saw there, and the fix.
"""

import dataclasses
import itertools
import logging
import os
import socket
import threading

import jax

log = logging.getLogger("loopjax")

ENV_PREFIX = "LOOPJAX_"
DEFAULT_TIMEOUT = 300  # seconds; pods whose hosts boot at different times need minutes
EXIT_CANNOT_JOIN = 3  # exit code of a process that could not join the distributed runtime
_JAX_GRACE = 15  # seconds JAX's own deadline is pushed past ours, so our message comes first
# At exit every process waits for the others at a shutdown barrier. JAX waits 300 s by default, so a
# process that died of an error would hang 5 minutes before its launcher saw it go.
SHUTDOWN_TIMEOUT = 60
_barrier_count = itertools.count()
_shared_count = itertools.count()


class DistributedError(RuntimeError):
  """Settings that cannot start a multi-process run; the message names the setting and the fix."""


@dataclasses.dataclass(frozen=True)
class Settings:
  coordinator: str | None = None  # "host:port" of process 0's coordinator service
  num_processes: int | None = None
  process_id: int | None = None
  local_devices: int | None = None  # fake CPU devices per process
  initialization_timeout: int = DEFAULT_TIMEOUT  # seconds to wait for all processes to join


_FIELDS = {"coordinator": str, "num_processes": int, "process_id": int, "local_devices": int,
           "initialization_timeout": int}


def add_arguments(parser):
  """The flags of `loopjax train` (argparse); each unset one falls back to its LOOPJAX_<NAME> variable."""
  group = parser.add_argument_group("multi-process start-up (each flag defaults to its environment variable)")
  group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (env LOOPJAX_COORDINATOR)")
  group.add_argument("--num_processes", type=int, metavar="N",
                     help="number of JAX processes (env LOOPJAX_NUM_PROCESSES)")
  group.add_argument("--process_id", type=int, metavar="ID",
                     help="this process's id, 0..num_processes-1 (env LOOPJAX_PROCESS_ID)")
  group.add_argument("--local_devices", type=int, metavar="N",
                     help="fake CPU devices per process (env LOOPJAX_LOCAL_DEVICES)")
  group.add_argument("--initialization_timeout", type=int, metavar="SECONDS",
                     help="seconds to wait for every process to join (env LOOPJAX_INITIALIZATION_TIMEOUT, "
                          f"default {DEFAULT_TIMEOUT})")


def settings_from(flag_values=None, environ=None) -> Settings:
  """Settings from parsed flags where set, else from the LOOPJAX_* environment variables.

  flag_values: an argparse Namespace, or any object with these attributes (None: environment only).
  """
  environ = os.environ if environ is None else environ
  values = {}
  for name, kind in _FIELDS.items():
    value = getattr(flag_values, name, None) if flag_values is not None else None
    if value is None and environ.get(ENV_PREFIX + name.upper(), "") != "":
      raw = environ[ENV_PREFIX + name.upper()]
      try:
        value = kind(raw)
      except ValueError:
        raise DistributedError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}. "
                               f"Fix: set it to a {kind.__name__} or unset it") from None
    if value is not None:
      values[name] = value
  return Settings(**values)


def initialize(settings: Settings) -> str:
  """Joins the distributed runtime if the settings or the cluster ask for it; returns the mode used.

  Modes: "single" (one process), "explicit" (settings), a cluster name such as "SlurmCluster", or
  "external" (jax.distributed was initialised by the caller).
  """
  if settings.local_devices is not None:
    if settings.local_devices < 1:
      raise DistributedError(f"local_devices={settings.local_devices}: must be >= 1. "
                             "Fix: pass --local_devices (or LOOPJAX_LOCAL_DEVICES) of at least 1")
    jax.config.update("jax_num_cpu_devices", settings.local_devices)
  if settings.initialization_timeout < 1:
    raise DistributedError(f"initialization_timeout={settings.initialization_timeout}: must be >= 1 s. "
                           "Fix: pass --initialization_timeout of a few minutes (default 300)")
  if jax.distributed.is_initialized():
    mode = "external"
  elif _explicit(settings):
    mode = "explicit" if settings.num_processes > 1 else "single"
    if mode == "explicit":
      _join(settings, dict(coordinator_address=settings.coordinator, num_processes=settings.num_processes,
                           process_id=settings.process_id))
  elif (cluster := detected_cluster()) is not None:
    mode = cluster
    _join(settings, {})
  else:
    mode = "single"
  if jax.process_count() > 1:
    _prefix_logs(jax.process_index(), jax.process_count())
  log.info("process %d of %d (%s start-up), %d local / %d global devices", jax.process_index(),
           jax.process_count(), mode, jax.local_device_count(), jax.device_count())
  return mode


def _explicit(s: Settings) -> bool:
  """True if any of coordinator/num_processes/process_id is set; then all three must be, and agree."""
  given = {"coordinator": s.coordinator, "num_processes": s.num_processes, "process_id": s.process_id}
  if all(v is None for v in given.values()):
    return False
  missing = [k for k, v in given.items() if v is None]
  if missing:
    flags_ = ", ".join(f"--{k} (or {ENV_PREFIX}{k.upper()})" for k in missing)
    raise DistributedError(f"multi-process start-up needs coordinator, num_processes and process_id "
                           f"together; missing {', '.join(missing)}. Fix: also set {flags_}, or unset the others "
                           "for a single-process run")
  if s.num_processes < 1 or not 0 <= s.process_id < s.num_processes:
    raise DistributedError(f"process_id={s.process_id} with num_processes={s.num_processes}: need "
                           "num_processes >= 1 and 0 <= process_id < num_processes. Fix: number the "
                           "processes 0..num_processes-1, each id used once")
  if s.num_processes > 1 and _split_address(s.coordinator) is None:
    raise DistributedError(f"coordinator={s.coordinator!r} is not host:port. Fix: pass the address of "
                           "process 0's host and a free port, e.g. --coordinator=10.0.0.2:8476")
  return True


def detected_cluster() -> str | None:
  """The cluster environment `jax.distributed.initialize()` would detect by itself, or None.

  Uses JAX's own detectors (TPU pod via metadata/env, SLURM step, Open MPI, Kubernetes), so loopjax
  and JAX never disagree on whether this is a multi-host job. Opt-in detectors (mpi4py) are skipped.
  """
  from jax._src import clusters  # jax <0.11 is pinned; the detectors have no public entry point
  for env in clusters.ClusterEnv._cluster_types:
    if not env.opt_in_only_method and env.is_env_present():
      return env.__name__
  return None


def _split_address(address: str | None) -> tuple[str, int] | None:
  host, sep, port = (address or "").rpartition(":")
  if not sep or not host or not port.isdigit():
    return None
  return host.strip("[]"), int(port)


def _probe(address: str | None) -> str:
  """What a TCP connect to the coordinator finds: the first clue to why joining failed."""
  parsed = _split_address(address)
  if parsed is None:
    return "the address was not known before joining"
  try:
    with socket.create_connection(parsed, timeout=3):
      return f"{address} accepts connections, so the coordinator runs but not every process joined"
  except socket.gaierror:
    return f"host {parsed[0]!r} does not resolve"
  except OSError as e:
    return f"nothing accepts connections at {address} ({e.strerror or e})"


def _join(settings: Settings, args: dict):
  """jax.distributed.initialize under a watchdog that turns a hang or C++ abort into a clear exit."""
  timeout = settings.initialization_timeout
  who = (f"process {settings.process_id} of {settings.num_processes}" if settings.process_id is not None
         else "this process")

  def give_up():
    address = args.get("coordinator_address") or _coordinator_seen()
    message = (
        f"{who} could not join the JAX distributed runtime at coordinator {address} within "
        f"{timeout} s: {_probe(address)}. Fix: start every process with the same coordinator address "
        f"(process 0's host and a free port, reachable from this host through any firewall), the same "
        f"num_processes, and each process_id in 0..num_processes-1 exactly once; process 0 hosts the "
        f"coordinator, so it must be running. If hosts start slowly, raise --initialization_timeout.")
    log.error(message)  # to stderr: absl's handler, or logging's last-resort handler without one
    for handler in logging.getLogger().handlers:
      handler.flush()
    os._exit(EXIT_CANNOT_JOIN)

  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(**args, initialization_timeout=timeout + _JAX_GRACE,
                               shutdown_timeout_seconds=SHUTDOWN_TIMEOUT)
  finally:
    watchdog.cancel()


def barrier(name: str, timeout: int = DEFAULT_TIMEOUT):
  """Waits until every process reaches `name` (through the coordination service; no-op alone).

  Call it before the first collective after work whose length differs between processes (compiling,
  restoring): on CPU, gloo gives up on peers that are 30 s late to a device group's first collective
  ("Gloo context initialization failed: DEADLINE_EXCEEDED").
  """
  if jax.process_count() > 1:
    from jax._src import distributed as jax_distributed
    barrier_id = f"loopjax_{name}_{next(_barrier_count)}"  # ids are single-use; every process counts alike
    jax_distributed.global_state.client.wait_at_barrier(barrier_id, timeout_in_ms=timeout * 1000)


def from_process_0(name: str, text: str, timeout: int = DEFAULT_TIMEOUT) -> str:
  """Process 0's `text`, on every process (alone: `text`). Every process calls it with the same names
  in the same order. Through the coordination service's key-value store: no device collective, so it
  may run before anything is compiled."""
  if jax.process_count() == 1:
    return text
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  key = f"loopjax_{name}_{next(_shared_count)}"  # keys are single-use; every process counts alike
  if jax.process_index() == 0:
    client.key_value_set(key, "=" + text)  # never an empty value
    return text
  return client.blocking_key_value_get(key, timeout * 1000)[1:]


def _coordinator_seen() -> str | None:
  """The coordinator address JAX settled on (auto-detected clusters), if it got that far."""
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.coordinator_address


class _ProcessPrefix(logging.Formatter):
  """Prefixes every log line with "[process i/n]" so interleaved or collected logs stay attributable."""

  def __init__(self, inner: logging.Formatter | None, prefix: str):
    super().__init__()
    self._inner, self._prefix = inner or logging.Formatter(), prefix

  def format(self, record):
    return self._prefix + self._inner.format(record)


def _prefix_logs(index: int, count: int):
  """Every process logs (its own warnings and errors above all); each line names its process.

  Progress (tqdm, metrics files, the final metrics line) is process 0's alone, in the train loop.
  """
  from absl import logging as absl_logging
  prefix = f"[process {index}/{count}] "
  for handler in logging.getLogger().handlers:
    if isinstance(handler, absl_logging.ABSLHandler):  # it formats through its inner python_handler
      handler = handler.python_handler
    if not isinstance(handler.formatter, _ProcessPrefix):
      handler.setFormatter(_ProcessPrefix(handler.formatter, prefix))
