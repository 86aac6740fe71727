"""Pre-flight a config on a TPU topology (memory per chip, fits, 100%-MFU bound), no TPU needed.

loopjax compile --config configs/ouro_1p4b.py --topology v5p:4x4x4 (needs the [tpu] extra). A staged
recipe (configs/ouro_recipe.py:1p4b) pre-flights every phase, one line each, or only --phase NAME.
Exits 0 if the train step fits each chip's HBM, 1 if not.
"""

from loopjax.cli import config_args


def add_arguments(parser):
  config_args.add_arguments(parser)
  parser.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:4x4x4 or v5p-128")
  parser.add_argument("--phase", default=None, help="a recipe's phase to pre-flight (default: all of them)")
  parser.add_argument("--explain", action="store_true",
                      help="also account for the temporaries by what they hold (from XLA's buffer assignment)")


def run(args) -> int:
  from loopjax.preflight import main as preflight
  return preflight(args.config, args.topology, args.config_file, args.phase, args.explain)
