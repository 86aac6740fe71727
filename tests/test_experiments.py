"""The experiments' --fast modes (a few steps per run), so the scripts in experiments/ cannot rot.

Each writes its workdirs, results.json and a PNG; the numbers of a fast run mean nothing, so only
their presence and shape are checked.
"""

import importlib.util
import json
import os

import pytest

pytest.importorskip("matplotlib")

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def _module(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run_fast(name: str, tmp_path) -> dict:
  results = _module(name).main(["--fast", "--out", str(tmp_path)])
  with open(tmp_path / "results.json") as f:
    assert json.load(f) == json.loads(json.dumps(results))
  with open(tmp_path / f"{name.removeprefix('exp_')}.png", "rb") as f:
    assert f.read(4) == b"\x89PNG"
  assert results["fast"] and results["steps"] == 4
  return results


def test_c_entropy_fast(tmp_path):
  results = _run_fast("exp_c_entropy", tmp_path)
  assert sorted(results["runs"]) == ["beta0.05_s0", "beta0.1_s0", "beta0_s0", "geometric_s0"]
  for run in results["runs"].values():
    assert len(run["exit_probs"]) == 4 and abs(sum(run["exit_probs"]) - 1) < 1e-4


def test_b_capo_fast(tmp_path):
  results = _run_fast("exp_b_capo", tmp_path)
  assert results["runs"]["T1_s0"]["params"] == results["runs"]["T4_s0"]["params"]
  assert len(results["T4_over_T1_per_seed"]) == 1 and results["world_bits"] == 512 * 32 * 4
  assert "claim" in results["verdict"]
  first = results["runs"]["T1_s0"]["wall_s"]
  assert first > 0  # the training time from phases.jsonl, not the time to collect a finished run
  again = _module("exp_b_capo").main(["--fast", "--out", str(tmp_path)])  # resumes both finished runs
  assert again["runs"]["T1_s0"]["wall_s"] == first


def test_b_verdict_applies_the_preregistered_rule():
  """Hand-made curves against the rule of RESULTS.md (claim b): levelled off, below the world, ratio band."""
  verdict = _module("exp_b_capo").verdict
  def run(plateau, final):  # bits at 10 evaluations of a 1000-step run: rising, a plateau from step 600, the decay
    return {"curve": {100 * i: plateau * min(i, 6) / 6 for i in range(1, 9)} | {900: final, 1000: final},
            "bits_stored": final}
  world = 100_000
  flat = {"T1_s0": run(20_000, 28_000), "T4_s0": run(19_000, 27_000)}
  assert verdict(flat, [27 / 28], world) == {"not_levelled_off": [], "near_the_whole_world": [], "claim": "reproduced"}
  assert verdict(flat, [0.80, 0.82], world)["claim"] == "not reproduced"
  assert verdict(flat, [0.97, 0.85], world)["claim"] == "not established"  # mean 0.91, one seed outside
  rising = dict(flat, T4_s0={"curve": {100 * i: 3_000 * i for i in range(1, 11)}, "bits_stored": 30_000})
  assert verdict(rising, [1.0], world) == {"not_levelled_off": ["T4_s0"], "near_the_whole_world": [],
                                          "claim": "not established"}
  assert verdict(flat, [1.0], 30_000)["near_the_whole_world"] == ["T1_s0", "T4_s0"]


@pytest.mark.slow
def test_a_manipulation_fast(tmp_path):
  results = _run_fast("exp_a_manipulation", tmp_path)
  assert sorted(results["exact_match"]) == ["2x1", "2x4", "8x1"]


@pytest.mark.slow
def test_d_loop_residual_fast(tmp_path):
  results = _run_fast("exp_d_loop_residual", tmp_path)
  assert sorted(results["runs"]) == ["12x1_s0", "6x1_s0", "6x6_scaled_s0"]
  assert results["runs"]["6x6_scaled_s0"]["lr"] == 3e-4 and results["runs"]["12x1_s0"]["lr"] == 1e-3
  assert set(results["verdict"]) == {"still_improving", "close_to_12x1", "beats_6x1"}
  assert os.path.exists(tmp_path / "data" / "val" / "manifest.json")


def test_d_verdict_applies_the_preregistered_rule():
  """Hand-made seed results against the rule of RESULTS.md (claim d): lower loss is better."""
  experiment = _module("exp_d_loop_residual")
  verdict = experiment.verdict
  def loss(*seeds):
    return dict(experiment.common.mean_spread(list(seeds)), per_seed=list(seeds))
  falling, flat = {"6x6_scaled": -0.05, "12x1": -0.01, "6x1": 0.0}, {"6x6_scaled": 0.0, "12x1": 0.0, "6x1": 0.0}
  clear = verdict({"6x6_scaled": loss(2.40, 2.41, 2.42), "12x1": loss(2.38, 2.39, 2.40), "6x1": loss(2.50, 2.51, 2.52)},
                  falling)
  assert clear == {"still_improving": ["6x6_scaled"], "close_to_12x1": "reproduced", "beats_6x1": "reproduced"}
  one_seed_loses = verdict({"6x6_scaled": loss(2.40, 2.41, 2.53), "12x1": loss(2.30, 2.30, 2.30),
                            "6x1": loss(2.50, 2.51, 2.52)}, flat)
  assert one_seed_loses["close_to_12x1"] == "not reproduced" and one_seed_loses["beats_6x1"] == "not established"
  worse = verdict({"6x6_scaled": loss(2.60, 2.61, 2.62), "6x1": loss(2.50, 2.51, 2.52)}, flat)
  assert worse == {"still_improving": [], "beats_6x1": "not reproduced"}


@pytest.mark.slow
def test_c_collapse_causes_fast(tmp_path):
  results = _run_fast("exp_c_collapse_causes", tmp_path)
  assert sorted(results["runs"]) == sorted(f"{n}_s0" for n in ["base", "gate_bias", "lr3e-4", "warm_start", "hops4", "lm_uniform"])
  assert results["runs"]["gate_bias_s0"]["exit_probs_first"][-1] > 0.5 > results["runs"]["base_s0"]["exit_probs_first"][-1]


@pytest.mark.slow
def test_d_diagnose_fast(tmp_path):
  results = _run_fast("exp_d_diagnose", tmp_path)
  assert len(results["runs"]) == 3 + 1 and sorted(results["best_lr"]) == ["12x1", "6x1", "6x6"]
  norms = results["residual_rms_per_layer_application"]
  assert len(norms["6x6"]["init"]) == 1 + 36 and len(norms["6x1"]["init"]) == 1 + 6
