"""Duplicate layers checkpoint to checkpoint: loopjax upscale --from CKPT --to CKPT --layers 48.

Works on the checkpoint files one array at a time, so memory stays near one array whatever the model
size; the output appears only once complete.
"""


def add_arguments(parser):
  from loopjax import upscale
  parser.add_argument("--from", dest="src", required=True,
                      help="source checkpoint directory (WORKDIR/checkpoints)")
  parser.add_argument("--to", dest="dst", required=True,
                      help="output checkpoint directory (a new WORKDIR/checkpoints)")
  parser.add_argument("--layers", type=int, required=True, help="layer count of the upscaled stack")
  parser.add_argument("--mapping", default="interleave", help="interleave, stack, or a comma-separated index list")
  parser.add_argument("--moments", default="duplicate", choices=upscale.MOMENTS,
                      help="Adam moments: duplicated with their layers, or reset to a fresh optimizer state")
  parser.add_argument("--step", type=int, default=None, help="the step to upscale (default: the newest)")


def run(args) -> int:
  from loopjax.checkpoint.upscale import upscale_checkpoint
  summary = upscale_checkpoint(args.src, args.dst, layers=args.layers, mapping=args.mapping,
                               moments=args.moments, step=args.step)
  print(f"upscaled step {summary['step']}: {summary['from_layers']} -> {summary['to_layers']} layers, "
        f"written to {summary['path']}", flush=True)
  return 0
