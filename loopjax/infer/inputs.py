"""Checks of what a user asks `generate` for: settings, prompts files, token ids, lengths.

Each problem is one `GenerateError` naming the flag or prompt line and the fix, raised before anything
compiles (the CLI prints it as one line and exits 2).
"""

import json

# The KV cache strategies (`loopjax.infer.cache`); here so the CLI can list them without importing JAX.
STRATEGIES = ("full", "last", "first", "mean")


class GenerateError(ValueError):
  """A bad generation request; the message names the setting or prompt and the fix."""


def _fail(what: str, problem: str, fix: str):
  raise GenerateError(f"{what}: {problem}. Fix: {fix}")


def check_settings(*, max_new_tokens: int, loop_steps: int, exit_threshold: float | None, kv_cache: str,
                   temperature: float, top_k: int, top_p: float, vocab_size: int):
  if max_new_tokens < 1:
    _fail(f"--max_new_tokens {max_new_tokens}", "must be at least 1", "give a positive count, e.g. 32")
  if loop_steps < 1:
    _fail(f"--loop_steps {loop_steps}", "must be at least 1", "give T >= 1, e.g. the trained 4")
  if exit_threshold is not None and not 0 < exit_threshold <= 1:
    _fail(f"--exit_threshold {exit_threshold}", "the Q-exit threshold q must be in (0, 1]",
          "give e.g. 0.5, or leave it out to run every loop step")
  if kv_cache not in STRATEGIES:
    _fail(f"--kv_cache {kv_cache}", "unknown KV cache strategy", f"use one of {', '.join(STRATEGIES)}")
  if temperature < 0:
    _fail(f"--temperature {temperature}", "must be >= 0", "give 0 for greedy decoding or a positive temperature")
  if not 0 <= top_k <= vocab_size:
    _fail(f"--top_k {top_k}", f"must be in [0, {vocab_size}] (the vocabulary)", "give 0 (off) or the number of "
          "tokens to keep")
  if not 0 < top_p <= 1:
    _fail(f"--top_p {top_p}", "must be in (0, 1]", "give e.g. 0.9, or 1 to turn nucleus sampling off")


def read_prompts_file(path: str) -> list[dict]:
  """The prompts of a JSONL file: each non-empty line {"ids": [...]} or {"text": "..."}."""
  try:
    with open(path) as f:
      lines = f.readlines()
  except OSError as e:
    raise GenerateError(f"--prompts_file {path}: cannot be read ({e.strerror}). Fix: give an existing "
                        "JSONL file") from None
  prompts = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      prompt = json.loads(line)
    except json.JSONDecodeError:
      prompt = None
    if not isinstance(prompt, dict) or not ({"ids", "text"} & set(prompt)):
      _fail(f"{path} line {number}", 'is not a JSON object with "ids" or "text"',
            'write one prompt per line: {"ids": [1, 2, 3]} or {"text": "..."}')
    prompts.append(dict(prompt, line=number))
  if not prompts:
    _fail(f"--prompts_file {path}", "holds no prompts", 'write one prompt per line: {"ids": [...]}')
  return prompts


def encode(prompts: list[dict], tokenizer) -> list[list[int]]:
  """Token ids of every prompt; text goes through `tokenizer`, with its document-start id like `prepare`."""
  ids = []
  for p in prompts:
    where = f"prompt {p.get('line', len(ids) + 1)}"
    if "ids" in p:
      if not isinstance(p["ids"], list) or not all(isinstance(i, int) for i in p["ids"]):
        _fail(where, '"ids" is not a list of whole numbers', 'give token ids, e.g. {"ids": [1, 2, 3]}')
      ids.append(list(p["ids"]))
    elif tokenizer is None:
      _fail(where, "a text prompt, but no tokenizer is known for this model",
            "pass --tokenizer (a tokenizer.json, or 'byte'), or give token ids {\"ids\": [...]}")
    else:
      encoded = tokenizer.encode_batch([str(p["text"])])[0].tolist()
      ids.append(encoded if tokenizer.bos_id is None else [tokenizer.bos_id] + encoded)
  return ids


def check_prompts(prompt_ids: list[list[int]], *, vocab_size: int, max_len: int, max_new_tokens: int):
  """Every prompt non-empty, its ids in the vocabulary, and prompt + new tokens within the cache."""
  for number, ids in enumerate(prompt_ids, 1):
    if not ids:
      _fail(f"prompt {number}", "is empty", "give at least one token (e.g. the document-start token)")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
      _fail(f"prompt {number}", f"token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})",
            "give ids the model's tokenizer produced")
    if len(ids) + max_new_tokens > max_len:
      _fail(f"prompt {number}", f"{len(ids)} tokens + {max_new_tokens} new ones do not fit the cache of "
            f"{max_len} positions", "shorten the prompt, lower --max_new_tokens or raise --max_len")
