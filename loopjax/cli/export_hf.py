"""Export a checkpoint as an HF Ouro directory: loopjax export-hf --checkpoint WORKDIR --output DIR.

Writes what transformers and vLLM load for OuroForCausalLM: config.json, model.safetensors (or shards
with an index above --max_shard_size), generation_config.json, a README.md model card and, when there
is a tokenizer (--tokenizer, or the one kept beside the run's prepared corpus), the tokenizer files.
The model code is the released Ouro repository's (config.json's auto_map); loopjax ships none. Tensors
are streamed one at a time; the output appears only when complete.
"""

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def add_arguments(parser):
  parser.add_argument("--checkpoint", required=True, help="a run's workdir or its checkpoints directory")
  parser.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the newest)")
  parser.add_argument("--output", required=True, help="the HF directory to write (must not exist or be empty)")
  parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                      help="dtype of the exported tensors (default: the run's model.param_dtype)")
  parser.add_argument("--tokenizer", default=None,
                      help="tokenizer.json to include (default: the one `loopjax prepare` kept beside the run's "
                           "corpus)")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
  parser.add_argument("--max_shard_size", type=byte_size, default="5GB",
                      help="split model.safetensors into shards of at most this size (default 5GB)")


def byte_size(text: str) -> int:
  """'5GB', '500MB', '2GiB' or a byte count -> bytes (argparse reports a ValueError as a usage error)."""
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text.upper())
  if not match:
    raise ValueError(text)
  return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def run(args) -> int:
  import jax
  jax.config.update("jax_platforms", "cpu")  # files only: probing for accelerators would cost ~0.1 GB of memory
  from loopjax.hf.export import export_checkpoint
  summary = export_checkpoint(args.checkpoint, args.output, step=args.step, dtype=args.dtype,
                              tokenizer=args.tokenizer, overwrite=args.overwrite,
                              max_shard_bytes=args.max_shard_size)
  tokenizer = f"tokenizer {summary['tokenizer']}" if summary["tokenizer"] else "no tokenizer"
  print(f"exported step {summary['step']}: {summary['params']:,} params in {summary['dtype']} "
        f"({summary['bytes'] / 1e9:.2f} GB, {len(summary['files'])} file(s)), {tokenizer}, to {summary['path']}",
        flush=True)
  return 0
