"""The argparse parser every command builds on: its errors are one line naming the flag, exit 2."""

import argparse

from loopjax.cli import logs


class Parser(argparse.ArgumentParser):
  """argparse without the usage block on errors: the line names the bad flag and where help is."""

  def error(self, message):
    unknown = message.partition("unrecognized arguments: ")[2]
    if unknown:
      message = f"unrecognized argument{'s' if ' ' in unknown else ''} {unknown}"
    self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the flags)\n")


def command_parser(name: str, module) -> Parser:
  """The parser of `loopjax <name>`: the module's docstring as its help, -v, then its own flags."""
  parser = Parser(prog=f"loopjax {name}", description=module.__doc__, allow_abbrev=False,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(*logs.VERBOSE_FLAGS, action="store_true", help=logs.VERBOSE_HELP)
  module.add_arguments(parser)
  return parser
