"""Process set-up shared by the commands that run JAX programs: the platforms, the compile cache and grain's flags."""

import glob
import importlib.util
import os
import pathlib

DEFAULT_COMPILE_CACHE = "~/.cache/loopjax/xla"
COMPILE_CACHE_MAX_BYTES = 16 * 2**30  # least recently used entries are evicted beyond this


def add_compile_cache_argument(parser):
  parser.add_argument("--compile_cache", default=DEFAULT_COMPILE_CACHE, metavar="DIR",
                      help="persistent XLA compilation cache directory ('' disables it); "
                           f"default {DEFAULT_COMPILE_CACHE}")


def skip_absent_tpu():
  """JAX_PLATFORMS=cpu on a machine with libtpu installed (the `test` and `tpu` extras) but no TPU or GPU.

  Why: JAX then still starts its TPU backend, and libtpu prints ~5 lines of errors ("could not determine TPU
  accelerator type", "unexpected worker hostname ...") before every command's own output. Nothing changes
  where a TPU is attached (PCI vendor 0x1ae0, what JAX itself checks), a GPU is visible, or the user set
  JAX_PLATFORMS; `loopjax compile --topology` still compiles for TPU (it loads libtpu for the topology alone).
  """
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return
  google = [p for p in glob.glob("/sys/bus/pci/devices/*/vendor") if pathlib.Path(p).read_text().strip() == "0x1ae0"]
  accelerators = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd", "/dev/accel0", "/dev/vfio/0")
  if not google and not any(os.path.exists(d) for d in accelerators):
    import jax  # read JAX_PLATFORMS at its import; the setting counts until a backend starts
    jax.config.update("jax_platforms", "cpu")
    os.environ["JAX_PLATFORMS"] = "cpu"  # for the processes this one starts


CPU_COLLECTIVE_TERMINATE_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"
CPU_COLLECTIVE_TERMINATE_SECONDS = 1800


def patient_cpu_collectives():
  """Raises XLA:CPU's limit on how late a collective's participants may arrive, unless XLA_FLAGS sets it.

  Why: XLA:CPU aborts the whole process (SIGABRT, "Termination timeout ... exceeded") when the devices of
  a collective arrive more than 60 s apart (a warning at 20 s, the abort 40 s later). With 8 fake CPU
  devices on a loaded 2-core host one device's thread can be starved that long inside a healthy step; CI
  lost a whole test run to it. A run that is really stuck is loopjax's watchdog's to end
  (`train.step_timeout`): it names what it waited for, dumps every thread's stack and exits resumably.
  Must run before the first backend starts (XLA reads XLA_FLAGS then); the processes this one starts
  inherit it.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if CPU_COLLECTIVE_TERMINATE_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_COLLECTIVE_TERMINATE_FLAG}={CPU_COLLECTIVE_TERMINATE_SECONDS}".strip()


def enable_compile_cache(path: str):
  """Compiled programs are kept across runs: a restarted or resumed run skips most of its compiling.

  Safe with several processes per host: JAX writes an entry in place, so a process reading it while
  another writes it (with jax.distributed only process 0 writes, and the others read) could load half an
  executable. A size bound makes JAX take a file lock around every read and write (and evict old entries).
  """
  import jax
  if path:
    path = os.path.expanduser(path)
    _date_unbounded_entries(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)


def _date_unbounded_entries(path: str):
  """Gives each entry an unbounded cache wrote (an older loopjax) the access-time file a bounded cache keeps
  beside it: JAX's eviction reads one per entry and fails every later write on a missing one."""
  for entry in glob.glob(os.path.join(glob.escape(path), "*-cache")):
    atime = entry[:-len("-cache")] + "-atime"
    try:
      if not os.path.exists(atime):
        stamp = os.stat(entry).st_mtime_ns.to_bytes(8, "little")
        with open(atime, "wb") as f:
          f.write(stamp)
    except FileNotFoundError:  # evicted by another process meanwhile
      pass


def allow_grain_workers():
  """grain reads its options from absl flags, which refuse to be read until parsed.

  The CLI parses with argparse, so absl's (all defaults) are marked parsed for `data.num_workers > 0`.
  """
  from absl import flags
  flags.FLAGS.mark_as_parsed()
