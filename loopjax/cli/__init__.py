"""`loopjax <command> [flags]`: one argparse parser per command, one module per command.

A command is a module `loopjax/cli/<name>.py` listed in COMMANDS (import-hf: cli/import_hf.py). Its
docstring is its help (the first line its entry in the command list), `add_arguments(parser)`
declares its flags and `run(args) -> int` does the work and returns the exit code. Commands that take
`--config` declare it with `config_args.add_arguments`; `args.config` is then the loaded config with every
`--config.a.b=VALUE` override applied. A module with `PASSES_UNKNOWN_FLAGS = True` (prepare) gets the flags
it does not declare in `args.pipeline_args` instead of an error. Modules import heavy libraries (jax, orbax) inside
functions, so listing the commands stays fast.
"""

import importlib
import sys

from loopjax.cli import config_args, errors, logs, parsing, runtime

COMMANDS = ("train", "eval", "generate", "prepare", "checkpoints", "upscale", "import-hf", "export-hf", "compile",
            "params", "config", "plot")


def main(argv: list[str] | None = None):
  """The `loopjax` executable."""
  sys.exit(run(sys.argv[1:] if argv is None else argv))


def run(argv: list[str]) -> int:
  """Runs `loopjax <argv>`; the exit code (argparse's --help and usage errors exit by themselves)."""
  if argv[:1] == ["--version"]:
    from importlib.metadata import version
    print(f"loopjax {version('loopjax')}")
    return 0
  if not argv or argv[0] not in COMMANDS:
    wants_help = argv[:1] in (["-h"], ["--help"])
    if argv and not wants_help:
      print(f"loopjax: unknown command {argv[0]!r}", file=sys.stderr)
    print(usage(), file=sys.stdout if wants_help else sys.stderr)
    return 0 if wants_help else errors.EXIT_USAGE
  name, argv = argv[0], argv[1:]
  verbose = logs.verbose_requested(argv)
  logs.set_native_level(verbose)  # before anything imports jax
  runtime.skip_absent_tpu()  # likewise: no libtpu start-up errors on a machine without a TPU
  runtime.patient_cpu_collectives()  # before any backend starts: a starved fake device is not a hang
  module = _command(name)
  return errors.reported(name, _parse_and_run, name, module, argv, verbose=verbose)


def _parse_and_run(name: str, module, argv: list[str]) -> int:
  parser = parsing.command_parser(name, module)
  argv, overrides = config_args.split_overrides(argv)
  if getattr(module, "PASSES_UNKNOWN_FLAGS", False):  # prepare: the flags it lacks are Beam's
    args, args.pipeline_args = parser.parse_known_args(argv)
  else:
    args = parser.parse_args(argv)
  logs.configure(args.verbose)
  if hasattr(args, "config_file"):
    args.config = config_args.load(args.config_file, overrides)
  elif overrides:
    parser.error(f"unrecognized argument {config_args.PREFIX}{overrides[0][0]}: `loopjax {name}` takes no config")
  return module.run(args)


def _command(name: str):
  return importlib.import_module(f"loopjax.cli.{name.replace('-', '_')}")


def usage() -> str:
  rows = "\n".join(f"  {name:12s} {_command(name).__doc__.splitlines()[0]}" for name in COMMANDS)
  return (f"usage: loopjax <command> [flags]  (loopjax --version: the installed version)\n\ncommands:\n{rows}\n\n"
          "`loopjax <command> --help` lists a command's flags; `loopjax <command> -v ...` also shows the "
          "libraries' INFO logs.")
