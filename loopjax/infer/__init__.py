"""Generation and adaptive-depth inference for Ouro (BUILD.md, "Inference").

  inputs.py     request checks (GenerateError), prompts files; no JAX, so the CLI stays fast
  cache.py      the KV cache [C, L, B, S_max, K, H] and its strategies full / last / first / mean
  attention.py  the loop step with attention over a cache (the training layer math, plus K/V out)
  decode.py     jitted prefill + decode; the early exit is a while_loop over loop steps
  sampling.py   greedy, temperature, top-k, top-p
  generator.py  lists of prompts -> fixed-shape batches -> results (the Python API)
  load.py       the model from a checkpoint or a HF directory, with its tokenizer and EOS ids

Scoring generations lives in `loopjax.evaluation.generation` (`loopjax eval --generate`).
"""
