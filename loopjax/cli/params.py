"""Print the parameter count of a config: loopjax params --config configs/ouro_1p4b.py."""

from loopjax.cli import config_args


def add_arguments(parser):
  config_args.add_arguments(parser)


def run(args) -> int:
  from loopjax.train.state import count_params
  print(f"{count_params(args.config.model):,}")
  return 0
