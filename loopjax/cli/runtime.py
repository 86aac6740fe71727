"""Process set-up shared by the commands that run JAX programs: the compile cache and grain's flags."""

import os

DEFAULT_COMPILE_CACHE = "~/.cache/loopjax/xla"


def add_compile_cache_argument(parser):
  parser.add_argument("--compile_cache", default=DEFAULT_COMPILE_CACHE, metavar="DIR",
                      help="persistent XLA compilation cache directory ('' disables it); "
                           f"default {DEFAULT_COMPILE_CACHE}")


def enable_compile_cache(path: str):
  """Compiled programs are kept across runs: a restarted or resumed run skips most of its compiling."""
  import jax
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def allow_grain_workers():
  """grain reads its options from absl flags, which refuse to be read until parsed.

  The CLI parses with argparse, so absl's (all defaults) are marked parsed for `data.num_workers > 0`.
  """
  from absl import flags
  flags.FLAGS.mark_as_parsed()
