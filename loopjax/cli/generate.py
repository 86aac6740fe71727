"""Generate text from a run's checkpoint or HF Ouro weights, with adaptive depth (Q-exit) per token.

  loopjax generate --hf DIR --prompt "Once upon a time" --max_new_tokens 32
  loopjax generate --checkpoint runs/smoke --prompts_file prompts.jsonl --exit_threshold 0.5 --output out.jsonl

Prompts file lines: {"ids": [...]} or {"text": "..."} (text needs the run's tokenizer or --tokenizer).
Output lines: {"prompt_ids", "generated_ids", "exit_steps", "text"}; exit_steps[i] is the loop step
(1..T) token i was read out at. Without --exit_threshold every token runs all T steps.
"""

import json
import sys

from loopjax.cli import runtime
from loopjax.infer import inputs
from loopjax.infer.inputs import STRATEGIES


def add_arguments(parser):
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint", help="a run's workdir or its checkpoints directory")
  source.add_argument("--hf", help="a HF Ouro directory (config.json + *.safetensors)")
  prompt = parser.add_mutually_exclusive_group(required=True)
  prompt.add_argument("--prompt", help="one text prompt")
  prompt.add_argument("--prompts_file", help='JSONL, one prompt per line: {"ids": [...]} or {"text": "..."}')
  parser.add_argument("--step", type=int, default=None, help="with --checkpoint: the step (default: the newest)")
  parser.add_argument("--tokenizer", default="", help="'byte' or a tokenizer.json (default: the run's or the "
                      "HF directory's)")
  parser.add_argument("--max_new_tokens", type=int, default=32)
  parser.add_argument("--loop_steps", type=int, default=0, help="T (default: the model's trained T)")
  parser.add_argument("--exit_threshold", type=float, default=None,
                      help="Q-exit q in (0, 1]: a token stops at the first step whose exit CDF reaches q")
  parser.add_argument("--kv_cache", default="full", choices=STRATEGIES,
                      help="what a token's K/V leaves for later tokens: every step's (full), or one per "
                           "layer: the last, first or mean over steps (1/T of the memory)")
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
  parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--eos_ids", default=None, help="comma-separated ids that end a sequence (default: "
                      "config.json's eos_token_id; none for a run)")
  parser.add_argument("--max_len", type=int, default=0, help="positions the cache may hold: prompt + new "
                      "tokens (default: max_position_embeddings, or the run's train.seq_len)")
  parser.add_argument("--batch_size", type=int, default=8, help="prompts decoded together")
  parser.add_argument("--output", default="", help="write the JSONL results here instead of stdout")
  runtime.add_compile_cache_argument(parser)


def run(args) -> int:
  from loopjax.infer import generator, load
  from loopjax.infer.sampling import Sampling
  runtime.enable_compile_cache(args.compile_cache)
  source = (load.from_checkpoint(args.checkpoint, args.step, args.tokenizer) if args.checkpoint
            else load.from_hf(args.hf, args.tokenizer))
  prompts = [{"text": args.prompt}] if args.prompt is not None else inputs.read_prompts_file(args.prompts_file)
  prompt_ids = inputs.encode(prompts, source.tokenizer)
  eos_ids = source.eos_ids if args.eos_ids is None else parse_ids(args.eos_ids)
  opts = generator.Options(max_new_tokens=args.max_new_tokens, loop_steps=args.loop_steps or None,
                           exit_threshold=args.exit_threshold, kv_cache=args.kv_cache,
                           sampling=Sampling(args.temperature, args.top_k, args.top_p), seed=args.seed,
                           eos_ids=eos_ids, batch_size=max(args.batch_size, 1))
  results = generator.generate_ids(source.model, prompt_ids, opts, args.max_len or source.max_len)
  out = open(args.output, "w") if args.output else sys.stdout
  for r in results:
    text = None if source.tokenizer is None else source.tokenizer.decode(r.generated_ids)
    out.write(json.dumps({**r._asdict(), "text": text}) + "\n")
  if args.output:
    out.close()
    depth = [s for r in results for s in r.exit_steps]
    print(f"{len(results)} prompts, {len(depth)} tokens, mean exit step {sum(depth) / max(len(depth), 1):.2f} "
          f"-> {args.output}")
  return 0


def parse_ids(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise inputs.GenerateError(f"--eos_ids {text}: not a comma-separated list of ids. Fix: e.g. --eos_ids 0,2") from None
