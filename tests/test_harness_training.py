"""Benchmarks of a trained smoke run: during training (the hook), after it (`loopjax eval --harness`,
`loopjax-lm-eval --model loopjax`), against chance, against `loopjax generate`, and in `loopjax plot`.

One smoke run (configs/smoke.py, multi-hop QA, 200 steps, the harness hook every 100 steps) is shared by
the module. Its multiple-choice accuracy (200 held-out 3-hop questions, 4 choices that the same person
reaches by some path) is ~0.5 by then; the untrained model's is 0.20-0.30 (chance 0.25, one standard
error 0.03).
"""

import json
import os
import subprocess
import sys

import pytest
from flax import nnx
from lm_eval.api.instance import Instance
from lm_eval.models.utils import postprocess_generated_text

from conftest import SUBPROCESS_CACHE
from loopjax.evaluation.harness import local_tasks, sweep
from loopjax.evaluation.harness import model as model_lib
from loopjax.evaluation.harness.backend import LoopjaxLM
from loopjax.evaluation.harness.depth import sweep_depths
from loopjax.model import build_model

pytestmark = pytest.mark.slow  # one 200-step training run (about a minute) and CLI runs beside it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TASKS = ",".join(local_tasks.NAMES)
ENV = dict(os.environ, JAX_PLATFORMS="cpu")  # libtpu's start-up lines (no TPU here) stay out of stderr


def _run(*argv: str) -> subprocess.Popen:
  return subprocess.Popen(list(argv), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("smoke"))
  proc = _run(os.path.join(BIN, "loopjax"), "train", "--config", "configs/smoke.py", "--workdir", workdir,
              "--config.train.steps=200", "--config.train.progress=False", "--config.eval.loop_steps=1,2,4",
              "--config.eval.harness_tasks=multihop_mc", "--config.eval.harness_every_steps=100",
              "--config.eval.harness_limit=100", "--compile_cache", SUBPROCESS_CACHE)
  _, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err
  return workdir


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_training_logs_the_benchmark_curve_and_plot_draws_it(workdir, tmp_path):
  rows = [r for r in _rows(workdir) if "harness_seconds" in r]
  assert [r["step"] for r in rows] == [100, 200]
  for r in rows:
    for depth in ("T1", "T2", "T4", "q0.5"):
      assert 0 <= r[f"harness/multihop_mc/acc/{depth}"] <= 1
    assert [r[f"harness/multihop_mc/mean_exit_step/T{t}"] for t in (1, 2, 4)] == [1, 2, 4]
    assert 1 <= r["harness/multihop_mc/mean_exit_step/q0.5"] <= 4
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(os.path.join(workdir, "tensorboard"))
  events.Reload()
  assert [e.step for e in events.Scalars("harness/multihop_mc/acc/T4")] == [100, 200]
  from loopjax.cli.plot import plot
  fig = plot([workdir], str(tmp_path / "run.png"))
  [panel] = [ax for ax in fig.axes if ax.get_title().startswith("Benchmarks (lm-eval) vs loop steps")]
  curves = [line for line in panel.get_lines() if line.get_marker() != "x"]
  assert [list(line.get_xdata()) for line in curves] == [[1, 2, 4]] * 2  # one curve per logged step
  assert list(curves[-1].get_ydata()) == [rows[-1][f"harness/multihop_mc/acc/T{t}"] for t in (1, 2, 4)]


def test_a_trained_model_scores_above_chance_and_an_untrained_one_at_chance(workdir):
  loaded = model_lib.from_source(model_lib.load_source(checkpoint=workdir))
  tasks = sweep.load_tasks(["multihop_mc"])
  run = sweep.Sweep(loaded, tasks, sweep_depths("1,2,4", "0.5", 4), batch_rows=32)
  trained = run()
  untrained = run(nnx.to_pure_dict(nnx.state(build_model(loaded.model_cfg, nnx.Rngs(0)), nnx.Param)))
  accuracy = {key: value for key, value in trained.items() if "/acc/" in key}
  assert len(accuracy) == 4 and min(accuracy.values()) >= 0.4, accuracy
  chance = [untrained[key] for key in accuracy]
  assert max(chance) <= 0.35 and 0.17 <= sum(chance) / len(chance) <= 0.33, chance


def test_lm_eval_and_loopjax_eval_run_the_shipped_tasks_alike(workdir, tmp_path):
  """The same requests at T=4 through lm-eval's command line and through the sweep: the same scores."""
  out = tmp_path / "lm_eval"
  lm_eval = _run(os.path.join(BIN, "loopjax-lm-eval"), "run", "--model", "loopjax", "--model_args",
                 f"checkpoint={workdir},loop_steps=4", "--tasks", TASKS, "--include_path", local_tasks.TASKS_DIR,
                 "--limit", "40", "--batch_size", "32", "--output_path", str(out))
  ours = _run(os.path.join(BIN, "loopjax"), "eval", "--checkpoint", workdir, "--harness", TASKS, "--loop_steps",
              "1,4", "--exit_thresholds", "0.5", "--limit", "40", "--output", str(tmp_path / "ours.jsonl"),
              "--compile_cache", SUBPROCESS_CACHE)
  (lm_out, lm_err), (our_out, our_err) = lm_eval.communicate(timeout=600), ours.communicate(timeout=600)
  assert lm_eval.returncode == 0, lm_err
  assert ours.returncode == 0, our_err
  [results_file] = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if f.startswith("results")]
  with open(results_file) as f:
    theirs = json.load(f)["results"]
  mine = json.loads((tmp_path / "ours.jsonl").read_text())
  assert mine == _rows(workdir)[-1] and mine["step"] == 200  # also appended to the run's metrics.jsonl
  assert theirs["multihop_mc"]["acc,none"] == mine["harness/multihop_mc/acc/T4"]
  assert theirs["multihop_gen"]["exact_match,none"] == mine["harness/multihop_gen/exact_match/T4"]
  assert theirs["multihop_rolling"]["bits_per_byte,none"] == pytest.approx(
      mine["harness/multihop_rolling/bits_per_byte/T4"], rel=1e-6)
  table = our_out.splitlines()
  assert table[1].split() == ["task", "metric", "T1", "T4", "q0.5"]
  assert "multihop_mc" in lm_out and "acc" in lm_out  # lm-eval's own results table


def test_generate_until_is_loopjax_generate(workdir, tmp_path):
  """The backend's generations at Q-exit q = 0.5 are `loopjax generate`'s text, cut at lm-eval's stops."""
  with open(os.path.join(local_tasks.TASKS_DIR, "multihop_gen.jsonl")) as f:
    questions = [json.loads(line)["question"] for line in f][:12]
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"text": q}) + "\n" for q in questions))
  out = tmp_path / "out.jsonl"
  cli = _run(os.path.join(BIN, "loopjax"), "generate", "--checkpoint", workdir, "--prompts_file", str(prompts),
             "--max_new_tokens", "4", "--exit_threshold", "0.5", "--batch_size", "32", "--output", str(out),
             "--compile_cache", SUBPROCESS_CACHE)  # the backend's batch: the same shapes, the same numbers
  lm = LoopjaxLM(checkpoint=workdir, exit_threshold=0.5)
  requests = [Instance("generate_until", {}, (q, {"until": [" "], "max_gen_toks": 4}), i, ("gen", i, 1))
              for i, q in enumerate(questions)]
  texts = lm.generate_until(requests)
  _, err = cli.communicate(timeout=300)
  assert cli.returncode == 0, err
  generated = [json.loads(line) for line in out.read_text().splitlines()]
  assert texts == [postprocess_generated_text(g["text"], [" ", "<bos>"], None) for g in generated]
  steps = [s for g in generated for s in g["exit_steps"]]
  assert lm.depth_tally["gen"] == [sum(steps), len(steps)]
