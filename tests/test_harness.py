"""The lm-eval backend on the Ouro fixture model, against the released code and a direct forward.

References: tests/fixtures/ouro_tiny_mha/expected.npz (the released PyTorch code's per-token CE of every
loop step and its Q-exit logits at q = 0.5, float32) for token-level log-likelihoods at every depth;
`load_ouro`'s forward (float32) for text requests, truncation and rolling windows; generate.npz (the
released code's greedy tokens) for generate_until. Log-likelihoods agree to 1e-4 relative (float32
sums of up to 23 tokens). Also: the shipped task files, and bad input (one line each).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from conftest import OURO_FIXTURE, SUBPROCESS_CACHE
from loopjax.config import ConfigError, default_config, validate
from loopjax.data import multihop, tasks
from loopjax.data.task_text import TaskTokenizer
from loopjax.data.tokenizer import TokenizerError
from loopjax.evaluation.harness import HarnessError, local_tasks
from loopjax.evaluation.harness import model as model_lib
from loopjax.evaluation.harness.backend import DepthLM, LoopjaxLM
from loopjax.evaluation.harness.depth import Depth, sweep_depths
from loopjax.evaluation.harness.scorer import Scorer
from loopjax.hf import load_ouro

HF = os.path.join(OURO_FIXTURE, "hf")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTE_BOS = 256
TOLERANCE = 1e-4


def close(actual: float, expected: float) -> bool:
  return abs(actual - expected) <= TOLERANCE * max(1.0, abs(expected))


def harness_model(tokenizer="byte", max_length=0):
  return model_lib.from_source(model_lib.load_source(hf=HF, tokenizer=tokenizer), max_length)


def lm_at(model, depths, depth=None, **kwargs) -> DepthLM:
  scorer = Scorer(model.model_cfg, model.mesh, depths, batch_rows=4, max_len=model.max_len)
  return DepthLM(model, depth or depths[0], scorer, **kwargs)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
  return [Instance(kind, {}, a, i, ("t", i, 1)) for i, a in enumerate(args)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
  logits = logits.astype(np.float64)
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def test_token_loglikelihoods_at_every_depth_are_the_released_codes():
  """Continuations of the fixture's rows at T = 1..4 and Q-exit q = 0.5, all from one forward per row."""
  e = np.load(os.path.join(OURO_FIXTURE, "expected.npz"))
  ids, token_ce = e["input_ids"], e["token_ce"]  # token_ce[t, b, s]: CE of ids[b, s + 1] at step t + 1
  q_logp = log_softmax(e["qexit_logits"])
  depths = [Depth(1), Depth(2), Depth(3), Depth(4), Depth(4, 0.5)]
  model = harness_model()
  shared = lm_at(model, depths)
  splits = [(b, k) for b in range(2) for k in (1, 5, 12, 23)]  # context ids[:k], continuation ids[k:]
  reqs = [((str(b), str(k)), ids[b, :k].tolist(), ids[b, k:].tolist()) for b, k in splits]
  for depth in depths:
    lm = DepthLM(model, depth, shared.scorer, shared.memo)
    for (b, k), (loglik, greedy) in zip(splits, lm._loglikelihood_tokens(reqs)):
      if depth.exit_threshold is None:
        expected = -token_ce[depth.loop_steps - 1, b, k - 1:].sum()
        argmax = e["step_logits"][depth.loop_steps - 1, b, k - 1:-1].argmax(-1)
      else:
        expected = q_logp[b, np.arange(k - 1, 23), ids[b, k:]].sum()
        argmax = e["qexit_logits"][b, k - 1:-1].argmax(-1)
      assert close(loglik, expected), (depth, b, k, loglik, expected)
      assert greedy == bool((argmax == ids[b, k:]).all())
    steps = [s for s, _ in lm._row_steps]
    if depth.exit_threshold is None:
      assert steps == [depth.loop_steps * (24 - k) for _, k in splits]
    else:
      assert steps == [int(e["qexit_step"][b, k - 1:-1].sum()) + 24 - k for b, k in splits]
  assert len(shared.memo) == len(splits)  # every depth came from the same forward of each row


def reference_loglik(model, tokens: list[int], span: int, loop_steps: int) -> float:
  """The last `span` tokens' log-probability from a direct float32 forward of the whole row."""
  logits = model(jnp.asarray([tokens[:-1]]), loop_steps=loop_steps).step_logits[-1, 0]
  logp = log_softmax(np.asarray(logits))
  positions = np.arange(len(tokens) - 1 - span, len(tokens) - 1)
  return float(logp[positions, np.asarray(tokens)[positions + 1]].sum())


def test_text_requests_follow_lm_evals_conventions_and_match_a_direct_forward():
  """Empty contexts, multi-token continuations, trailing spaces, left truncation, rolling windows."""
  reference = load_ouro(HF)
  max_len = 16
  lm = lm_at(harness_model(max_length=max_len), [Depth(3)])
  cases = [("", "Hello", "Hello"), ("The cat sat", " on it", " on it"), ("x y ", "z", " z"),
           ("a context far longer than sixteen bytes", " end", " end")]
  got = lm.loglikelihood(requests("loglikelihood", [(c, x) for c, x, _ in cases]))
  for (context, continuation, scored), (loglik, _) in zip(cases, got):
    text = (context + continuation).encode()
    tokens = ([BYTE_BOS] + list(text))[-(max_len + 1):]
    assert close(loglik, reference_loglik(reference, tokens, len(scored.encode()), 3)), (context, continuation)
  assert dict(lm.depth_tally) == {"t": [3 * sum(len(s.encode()) for *_, s in cases), sum(len(s.encode())
                                                                                          for *_, s in cases)]}
  document = "The quick brown fox jumps over the lazy dog"
  windows = [make_disjoint_window(w) for w in get_rolling_token_windows(list(document.encode()), BYTE_BOS, max_len, 1)]
  assert len(windows) == 3 and sum(len(c) for _, c in windows) == len(document)
  expected = sum(reference_loglik(reference, ctx + cont, len(cont), 3) for ctx, cont in windows)
  [rolling] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(document,)]))
  assert close(rolling, expected)


def test_greedy_generation_is_the_released_codes_and_stops_where_lm_eval_says():
  """generate_until over a word-per-id tokenizer (so the fixture's raw prompt ids are text)."""
  g = np.load(os.path.join(OURO_FIXTURE, "generate.npz"))
  word = "w{:03d}".format  # one width, so no word's text is inside another's (stop sequences are text)
  ids_as_words = tasks.Task("ids", 320, None, None, tuple(map(word, range(320))))
  source = model_lib.load_source(hf=HF, tokenizer="byte")._replace(tokenizer=TaskTokenizer(ids_as_words))
  lm = lm_at(model_lib.from_source(source), [Depth(4)], add_bos_token=False)
  prompts = [" ".join(map(word, p)) for p in g["prompt_ids"].tolist()]
  expected = [" ".join(map(word, out)) for out in g["generated_ids"].tolist()]
  stop = f" {word(g['generated_ids'][1, 5])} "  # stop sequences cut the text, as lm-eval's HF backend does
  texts = lm.generate_until(requests("generate_until", [(prompts[0], {"until": [], "max_gen_toks": 16}),
                                                        (prompts[1], {"until": [stop], "max_gen_toks": 16})]))
  assert texts[0] == expected[0]
  assert texts[1] == " ".join(expected[1].split()[:5])
  assert dict(lm.depth_tally) == {"t": [4 * 32, 32]}


def test_shipped_task_files_are_the_synthetic_tasks(tmp_path):
  """The JSONL files are what local_tasks makes from the default world, and their answers are right."""
  local_tasks.write_task_files(str(tmp_path))
  for name in local_tasks.NAMES:
    with open(os.path.join(local_tasks.TASKS_DIR, f"{name}.jsonl")) as f:
      assert (tmp_path / f"{name}.jsonl").read_text() == f.read()
    assert os.path.isfile(os.path.join(local_tasks.TASKS_DIR, f"{name}.yaml"))
  d = default_config().data
  world = multihop.World(d.task_seed, d.multihop_people, d.multihop_relations, d.multihop_max_hops)
  names = TaskTokenizer(tasks.make_task("multihop", d)).names
  docs = local_tasks.documents(d)
  for mc, gen in zip(docs["multihop_mc"], docs["multihop_gen"]):
    _, person, *path, _ = mc["question"].split()
    path = [int(r[1:]) for r in path]
    answer = world.answer(int(person[1:]), path)
    assert mc["choices"][mc["answer"]] == gen["answer"] == names[world.person_base + answer]
    assert len(set(mc["choices"])) == local_tasks.CHOICES


def test_bad_settings_are_one_clear_error():
  with pytest.raises(HarnessError, match=r"^--loop_steps: loop_steps 0 must be at least 1\. Fix: "):
    sweep_depths("1,0", "", 4)
  with pytest.raises(HarnessError, match=r"^--exit_thresholds: exit threshold 1.5 is outside \(0, 1\]"):
    sweep_depths("", "0.5,1.5", 4)
  with pytest.raises(HarnessError, match=r"^--loop_steps '1,x': not a comma-separated list"):
    sweep_depths("1,x", "", 4)
  assert sweep_depths("", "0.5", 4) == [Depth(4), Depth(4, 0.5)]
  with pytest.raises(HarnessError, match="no tokenizer is known for this model.*Fix: name it"):
    LoopjaxLM(hf=HF)
  with pytest.raises(HarnessError, match="exactly one of checkpoint=WORKDIR and hf=DIR"):
    LoopjaxLM()
  with pytest.raises(HarnessError, match="kv_cache=some: unknown KV cache strategy"):
    LoopjaxLM(hf=HF, tokenizer="byte", kv_cache="some")
  with pytest.raises(HarnessError, match="model_args: loop_steps -1 must be at least 1"):
    LoopjaxLM(hf=HF, tokenizer="byte", loop_steps=-1)
  words = TaskTokenizer(tasks.make_task("multihop", default_config().data))
  assert words.decode(words.encode_batch(["<hops_2>  P3 r1\tr0 <ans>"])[0].tolist()) == "<hops_2> P3 r1 r0 <ans>"
  with pytest.raises(TokenizerError, match=r"^'P99' is not a word of the multihop task's text form .*Fix: "):
    words.encode_batch(["<hops_1> P99 r0"])
  cfg = default_config()
  cfg.eval.harness_tasks = "multihop_mc"
  with pytest.raises(ConfigError, match="config.eval.harness_tasks: .*Fix: set both"):
    validate(cfg, jax.device_count())


def _cli(*argv: str, **env) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "loopjax.cli", "eval", "--hf", HF, *argv, "--compile_cache",
                           SUBPROCESS_CACHE], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **env))


@pytest.mark.slow  # indexing lm-eval's own tasks takes ~10 s per process
def test_cli_refuses_bad_tasks_and_settings_in_one_line(tmp_path):
  offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path)}
  procs = {"unknown": _cli("--tokenizer", "byte", "--harness", "multihop_mc,no_such_task"),
           "offline": _cli("--tokenizer", "byte", "--harness", "arc_easy", **offline),
           "tokenizer": _cli("--harness", "multihop_mc", "--loop_steps", "2,4")}
  expected = {"unknown": "unknown task 'no_such_task'", "offline": "task 'arc_easy' needs a dataset that is not "
              "available here", "tokenizer": "no tokenizer is known"}
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (name, err)
    assert err.strip().count("\n") == 0 and expected[name] in err and "Fix: " in err, (name, err)
    assert err.startswith("loopjax eval: ")


def test_the_entry_point_names_the_backend():
  from importlib.metadata import entry_points
  [point] = [p for p in entry_points(group="lm_eval.models") if p.name == "loopjax"]
  assert point.load() is LoopjaxLM
  from lm_eval.api.registry import get_model
  assert get_model("loopjax") is LoopjaxLM  # registered by importing the backend


def test_the_training_hook_scores_sharded_live_parameters_as_their_checkpoint_does(tmp_path):
  """A 4-step run on a (data 4, fsdp 2) mesh with the hook: its step-4 row equals a sweep of the step-4
  checkpoint's parameters restored on a plain data-parallel mesh."""
  from helpers import tiny_config
  from loopjax.evaluation.harness import sweep
  from loopjax.train.driver import train
  cfg = tiny_config(vocab_size=128)
  cfg.data.source, cfg.mesh.data, cfg.mesh.fsdp = "multihop", 4, 2
  cfg.train.batch_size, cfg.train.seq_len, cfg.train.steps = 8, 32, 4
  cfg.eval.loop_steps, cfg.eval.q_exit = "1,3", 0.5
  cfg.eval.harness_tasks = ",".join(local_tasks.NAMES)
  cfg.eval.harness_every_steps, cfg.eval.harness_limit = 2, 12
  workdir = str(tmp_path / "run")
  train(cfg, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if "harness_seconds" in r]
  assert [r["step"] for r in rows] == [2, 4]
  logged = {k: v for k, v in rows[-1].items() if k.startswith("harness/")}
  restored = model_lib.from_source(model_lib.load_source(checkpoint=workdir))
  tasks = sweep.load_tasks(local_tasks.NAMES)
  again = sweep.Sweep(restored, tasks, sweep_depths("1,3", "0.5", 3), batch_rows=32, limit=12)()
  assert logged.keys() == again.keys() and len(logged) == 3 * (5 + 3)  # 3 depths x (5 metrics + 3 exit steps)
  for key, value in logged.items():
    assert value == pytest.approx(again[key], rel=1e-5), key
