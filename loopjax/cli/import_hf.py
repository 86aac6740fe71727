"""Start a run from released HF weights: loopjax import-hf --hf DIR --config CONFIG --workdir W.

Checks the config's model section against the HF config.json (every differing field named in one
error) and every tensor's name and shape, then writes W's first checkpoint, step 0: the HF parameters
in the config's param_dtype and shardings, read one tensor at a time, and a fresh optimizer state.
`loopjax train --config CONFIG --workdir W` continues from it; `loopjax upscale --from W/checkpoints`
grows it. Without this step: `loopjax train ... --config.init.from_hf=DIR` starts from the weights too.
"""

from loopjax.cli import config_args


def add_arguments(parser):
  parser.add_argument("--hf", required=True, help="the HF directory: config.json and model.safetensors (or "
                                                  "model.safetensors.index.json and its shards)")
  config_args.add_arguments(parser)
  parser.add_argument("--workdir", required=True, help="the new run's directory (must hold no checkpoint)")


def run(args) -> int:
  from loopjax.train.driver import write_start_checkpoint
  cfg = args.config
  cfg.init.from_hf, cfg.init.from_checkpoint = args.hf, ""
  path = write_start_checkpoint(cfg, args.workdir)
  print(f"imported {args.hf} as step 0 in {path}; continue with: loopjax train --config {args.config_file} "
        f"--workdir {args.workdir}", flush=True)
  return 0
