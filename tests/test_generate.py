"""Generation (loopjax.infer): the released code's greedy tokens, cached == uncached decoding, early exit.

References: tests/fixtures/ouro_tiny_mha/generate.npz (the released PyTorch code, uncached greedy
decoding); the model's own uncached forward (`model(tokens)`, the path test_model.py checks against a
float64 numpy reference); and `unrolled_reference` below, a one-row-at-a-time decoder in Python loops
with a numpy K/V store per (position, step), which spells out the strategies and the exit-step K/V
copy independently of the batched while_loop and cache code.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import OURO_FIXTURE as FIXTURE, SUBPROCESS_CACHE
from helpers import merged_model, random_params, tiny_config
from loopjax import exits
from loopjax.evaluation import generation
from loopjax.hf import load_ouro
from loopjax.infer import cache, decode, generator, inputs
from loopjax.infer.attention import Past, StepSettings, cached_loop_step
from loopjax.infer.sampling import Sampling, sample, top_k_mask, top_p_mask
from loopjax.model import layers

LOOPJAX = os.path.join(os.path.dirname(sys.executable), "loopjax")
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LENGTHS = np.array([5, 9, 1, 12], np.int32)  # mixed prompt lengths, right-padded to 12
NEW = 6
T = 3


def rel_err(actual, expected) -> float:
  expected = np.asarray(expected)
  return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def tiny():
  """A random tiny GQA model (4 heads, 2 kv heads, T=3), its device weights and mixed-length prompts."""
  cfg = tiny_config()
  model = merged_model(cfg.model, random_params(cfg.model, seed=3))
  prompts_BP = np.zeros((len(LENGTHS), LENGTHS.max()), np.int32)
  rng = np.random.default_rng(0)
  for b, n in enumerate(LENGTHS):
    prompts_BP[b, :n] = rng.integers(0, cfg.model.vocab_size, n)
  return model, jax.device_put(decode.weights_of(model)), prompts_BP


def run(tiny, strategy: str, threshold: float, **spec):
  model, weights, prompts_BP = tiny
  spec = decode.spec_for(model.cfg, **{"loop_steps": T, "strategy": strategy, "cache_len": 24,
                                       "max_new_tokens": NEW, "keep_logits": True, **spec})
  return jax.tree.map(np.asarray, decode.generate_jit(weights, spec, prompts_BP, LENGTHS, jax.random.key(0),
                                                      jnp.float32(threshold)))


def test_reproduces_the_released_codes_greedy_generation():
  g = dict(np.load(os.path.join(FIXTURE, "generate.npz")))
  model = load_ouro(os.path.join(FIXTURE, "hf"))
  B, P = g["prompt_ids"].shape
  N = g["generated_ids"].shape[1]
  spec = decode.spec_for(model.cfg, loop_steps=4, strategy="full", cache_len=P + N, max_new_tokens=N,
                         keep_logits=True)
  out = decode.generate_jit(decode.weights_of(model), spec, jnp.asarray(g["prompt_ids"], jnp.int32),
                            jnp.full((B,), P, jnp.int32), jax.random.key(0), jnp.float32(decode.NO_EXIT))
  np.testing.assert_array_equal(out.tokens_BN, g["generated_ids"])
  assert rel_err(out.logits_NBV, g["decode_logits"]) <= 1e-4
  assert (np.asarray(out.exit_steps_BN) == 4).all() and (np.asarray(out.loop_trips_N) == 4).all()


def test_cached_full_depth_decode_equals_the_uncached_forward(tiny):
  """Row b's token n was chosen from the last step's logits at position len_b - 1 + n of its sequence."""
  model, _, prompts_BP = tiny
  out = run(tiny, "full", decode.NO_EXIT)
  seqs = np.zeros((len(LENGTHS), LENGTHS.max() + NEW), np.int32)
  for b, n in enumerate(LENGTHS):
    seqs[b, :n], seqs[b, n:n + NEW] = prompts_BP[b, :n], out.tokens_BN[b]
  logits_BSV = np.asarray(model(jnp.asarray(seqs)).step_logits[-1])
  expected_NBV = np.stack([logits_BSV[b, n - 1:n - 1 + NEW] for b, n in enumerate(LENGTHS)], axis=1)
  assert rel_err(out.logits_NBV, expected_NBV) <= 1e-5
  np.testing.assert_array_equal(out.tokens_BN, expected_NBV.argmax(-1).T)
  assert (out.exit_steps_BN == T).all() and (out.loop_trips_N == T).all()


def unrolled_reference(model, prompt: list[int], strategy: str, q: float, step_fn):
  """One row, token by token, Python loops over steps: (tokens, exit steps 1..T, logits per token).

  store[p][t] = (k, v) [L, K, H] of position p at step t; an early-exited token's deeper steps copy its
  exit step. Prompt tokens before the last attend to the same step's K/V (prefill); decoded tokens read
  the strategy's value of each earlier position at their step.
  """
  reduce = {"full": lambda kv_T, t: kv_T[t], "last": lambda kv_T, t: kv_T[-1],
            "first": lambda kv_T, t: kv_T[0], "mean": lambda kv_T, t: np.mean(kv_T, axis=0)}[strategy]
  parts, head_DV, embed_VD = model.loop_parts(), np.asarray(model.head_kernel()), np.asarray(model.embed[...])
  store, tokens, steps, logits = [], list(prompt), [], []
  for pos in range(len(prompt) - 1 + NEW):
    decoding = pos >= len(prompt) - 1
    h, gates, kv_T = embed_VD[tokens[pos]][None, None], [], []
    for t in range(T):
      L, _, K, H = parts.stack["wk"].shape
      past = np.zeros((2, 1, L, 1, K, 24, H), np.float32)
      for p, kv_Tx in enumerate(store):
        past[:, 0, :, 0, :, p] = reduce(np.stack(kv_Tx), t) if decoding else kv_Tx[t]
      h, gate, k, v = step_fn(h, past, pos)
      gates.append(float(gate[0, 0]))
      kv_T.append(np.stack([k[:, 0, :, 0], v[:, 0, :, 0]]))  # [2, L, K, H]
      if decoding and exits.exit_cdf(jnp.array(gates + [0.0] * (T - 1 - t)))[t] >= q:
        break
    steps.append(t + 1)
    store.append([kv_T[min(s, t)] for s in range(T)])
    if decoding:
      logits.append(np.asarray(h[0, 0]) @ head_DV)
      tokens.append(int(np.argmax(logits[-1])))
  return tokens[len(prompt):], steps[len(prompt) - 1:], np.stack(logits)


@pytest.fixture(scope="module")
def step_fn(tiny):
  model = tiny[0]
  m = model.cfg

  @jax.jit
  def fn(h, past, pos):
    cos, sin = layers.rope_tables(jnp.full((1, 1), pos), m.head_dim, m.rope_base)
    s = StepSettings(cos, sin, m.norm_eps, jnp.float32)
    allowed = (jnp.arange(24) < pos)[None, None]
    return cached_loop_step(model.loop_parts(), h, s, Past(cache.KVCache(past[0], past[1]), jnp.int32(0), allowed))
  return fn


@pytest.mark.parametrize("strategy", ["full", "last", "first", "mean"])
def test_early_exit_matches_the_unrolled_reference_and_skips_steps(tiny, step_fn, strategy):
  model, _, prompts_BP = tiny
  out = run(tiny, strategy, 0.5)
  for b, n in enumerate(LENGTHS):
    tokens, steps, logits = unrolled_reference(model, prompts_BP[b, :n].tolist(), strategy, 0.5, step_fn)
    np.testing.assert_array_equal(out.tokens_BN[b], tokens)
    np.testing.assert_array_equal(out.exit_steps_BN[b], steps)
    assert rel_err(out.logits_NBV[:, b], logits) <= 1e-5
  # The loop over steps ran exactly as long as the deepest row needed, and that was often < T.
  np.testing.assert_array_equal(out.loop_trips_N, out.exit_steps_BN.max(axis=0))
  assert (out.exit_steps_BN < T).mean() > 0.3 and (out.loop_trips_N < T).any()


def test_a_single_row_runs_only_its_exit_step(tiny):
  model, weights, prompts_BP = tiny
  spec = decode.spec_for(model.cfg, loop_steps=T, strategy="full", cache_len=24, max_new_tokens=NEW)
  out = decode.generate_jit(weights, spec, prompts_BP[:1], LENGTHS[:1], jax.random.key(0), jnp.float32(0.5))
  np.testing.assert_array_equal(out.loop_trips_N, out.exit_steps_BN[0])
  assert (np.asarray(out.loop_trips_N) < T).any()


def test_bfloat16_compute_decodes_close_to_float32(tiny):
  """bfloat16 runs end to end (XLA's CPU dot has no bf16 x bf16 -> f32 form) and tracks float32."""
  _, _, prompts_BP = tiny
  cfg = tiny_config(compute_dtype="bfloat16")
  model = merged_model(cfg.model, random_params(cfg.model, seed=3))
  out = run((model, jax.device_put(decode.weights_of(model)), prompts_BP), "mean", 0.5)
  reference = run(tiny, "mean", 0.5)
  assert rel_err(out.logits_NBV[0], reference.logits_NBV[0]) <= 0.05


def test_last_strategy_keeps_one_T_th_of_the_cache():
  sizes = {s: cache.cache_bytes(s, 4, 24, 8, 4096, 16, 128, jnp.bfloat16) for s in cache.STRATEGIES}
  assert sizes["full"] == 2 * 4 * 24 * 8 * 4096 * 16 * 128 * 2
  assert sizes["last"] <= sizes["full"] * (1 / 4 + 0.05)
  assert sizes["last"] == sizes["first"] == sizes["mean"]


def test_stops_at_eos_and_pads_after_it(tiny):
  full = run(tiny, "full", decode.NO_EXIT)
  eos = int(full.tokens_BN[0, 1])
  out = run(tiny, "full", decode.NO_EXIT, eos_ids=(eos,))
  for b in range(len(LENGTHS)):
    row = full.tokens_BN[b].tolist()
    end = row.index(eos) + 1 if eos in row else NEW
    np.testing.assert_array_equal(out.tokens_BN[b, :end], row[:end])
    assert (out.tokens_BN[b, end:] == -1).all() and (out.exit_steps_BN[b, end:] == 0).all()


def test_sampling_masks_and_seeds():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  assert np.isfinite(top_k_mask(logits, 2)).tolist() == [[True, True, False, False]]
  assert np.isfinite(top_p_mask(logits, 0.75)).tolist() == [[True, True, False, False]]
  assert np.isfinite(top_p_mask(logits, 0.85)).tolist() == [[True, True, True, False]]
  assert np.isfinite(top_p_mask(logits, 0.1)).tolist() == [[True, False, False, False]]
  assert int(sample(logits, jax.random.key(0), Sampling())[0]) == 0
  many = jnp.tile(logits, (2000, 1))
  draws = np.asarray(sample(many, jax.random.key(1), Sampling(temperature=1.0, top_k=3)))
  np.testing.assert_allclose(np.bincount(draws, minlength=4) / 2000, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0],
                             atol=0.04)
  again = np.asarray(sample(many, jax.random.key(1), Sampling(temperature=1.0, top_k=3)))
  np.testing.assert_array_equal(draws, again)


@pytest.mark.parametrize("change, message", [
    (dict(prompt_ids=[list(range(30))]), "do not fit the cache of 32 positions"),
    (dict(prompt_ids=[[1, 2, 64]]), "token id 64 is outside the model's vocabulary"),
    (dict(prompt_ids=[[]]), "is empty"),
    (dict(exit_threshold=0.0), "--exit_threshold 0.0: the Q-exit threshold q must be in (0, 1]"),
    (dict(exit_threshold=1.5), "--exit_threshold 1.5"),
    (dict(sampling=Sampling(1.0, 0, 0.0)), "--top_p 0.0: must be in (0, 1]"),
    (dict(sampling=Sampling(1.0, 0, 1.2)), "--top_p 1.2"),
    (dict(kv_cache="middle"), "--kv_cache middle: unknown KV cache strategy"),
])
def test_each_bad_request_is_one_clear_error(change, message):
  m = tiny_config().model
  prompt_ids = change.pop("prompt_ids", [[1, 2, 3]])
  with pytest.raises(inputs.GenerateError, match="Fix: ") as error:
    generator.check(m, prompt_ids, generator.Options(max_new_tokens=4, **change), max_len=32)
  assert message in str(error.value)


def test_text_prompts_need_a_tokenizer(tmp_path):
  with pytest.raises(inputs.GenerateError, match="no tokenizer is known.*Fix: pass --tokenizer"):
    inputs.encode([{"text": "hi", "line": 2}], None)
  path = tmp_path / "p.jsonl"
  path.write_text('{"ids": [1, 2]}\n\n{"prompt": "x"}\n')
  with pytest.raises(inputs.GenerateError, match="line 3: is not a JSON object"):
    inputs.read_prompts_file(str(path))


def test_eval_generate_full_depth_matches_the_forward_argmax():
  """Generated answers at full depth are the last step's argmax of the uncached forward over the prompt."""
  cfg = tiny_config()
  cfg.data.source, cfg.model.vocab_size = "multihop", 128
  model = merged_model(cfg.model, random_params(cfg.model, seed=4))
  prompts, answers = generation.questions(cfg, 16)
  results = generation.curve(model, jax.device_put(decode.weights_of(model)), prompts, answers, 2, 64)
  logits = model(jnp.asarray(prompts), loop_steps=2).step_logits[-1, :, -1]
  expected = float(np.mean(np.asarray(logits.argmax(-1)) == np.array(answers)[:, 0]))
  assert results["gen_T2/exact_match_full_depth"] == expected
  depths = results["gen_T2/mean_depth_q"]
  assert len(depths) == 9 and all(1 <= d <= 2 for d in depths) and depths == sorted(depths)
  table = generation.format_table({"gen/q": list(generation.THRESHOLDS), **results})
  assert table.splitlines()[-1].split()[0] == "2"


def test_cli_generates_the_fixture_tokens_and_reports_bad_input(tmp_path):
  g = np.load(os.path.join(FIXTURE, "generate.npz"))
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"ids": p}) + "\n" for p in g["prompt_ids"].tolist()))
  out = tmp_path / "out.jsonl"
  hf = os.path.join(FIXTURE, "hf")
  good = [LOOPJAX, "generate", "--hf", hf, "--prompts_file", str(prompts), "--max_new_tokens", "16",
          "--output", str(out), "--compile_cache", SUBPROCESS_CACHE]
  bad = [LOOPJAX, "generate", "--hf", hf, "--prompt", "hello"]
  # JAX_PLATFORMS=cpu: the test extra installs libtpu, whose own start-up lines (no TPU here) would
  # otherwise reach stderr whenever its lock file is free; the one-line error is loopjax's to keep.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for argv in (good, bad)]
  (good_out, good_err), (_, bad_err) = (p.communicate(timeout=120) for p in procs)
  assert procs[0].returncode == 0, good_err
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [line["generated_ids"] for line in lines] == g["generated_ids"].tolist()
  assert all(line["exit_steps"] == [4] * 16 and line["text"] is None for line in lines)
  assert "2 prompts, 32 tokens" in good_out
  assert procs[1].returncode == 2
  assert bad_err.strip().count("\n") == 0 and "no tokenizer is known" in bad_err
