"""Staged recipes: the plan and its validation (fast), and the smoke recipe run by real processes (slow).

The end-to-end bar: every step's logged settings are the recipe's (integers exactly, floats to float32
rounding: rtol 1e-6), each step is logged once, and a run killed with SIGKILL in its third phase and
restarted logs the uninterrupted run's losses bit for bit (same program, same data, same CPU).
"""

import importlib.util
import json
import math
import os
import re
import signal
import subprocess

import pytest

import _train_subprocess as ts
from helpers import tiny_config
from loopjax import phases
from loopjax.checkpoint.listing import list_checkpoints
from loopjax.config import ConfigError, validate
from loopjax.train.driver import check_run
from loopjax.train.state import count_params

RECIPES = os.path.join(ts.REPO, "configs")
M = 2**20


def ouro_recipe(path):
  spec = importlib.util.spec_from_file_location("ouro_recipe", os.path.join(RECIPES, "ouro_recipe.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(path)


# SPEC section 3: (tokens, seq, T, beta, RoPE base, batch tokens after any ramp, LR at the end)
STAGES = {"1a": (3e12, 4096, 8, 0.1, 1e4, 8 * M, 3e-4), "1b": (3e12, 4096, 4, 0.05, 1e4, 8 * M, 3e-4),
          "2": (1.4e12, 16384, 4, 0.05, 4e4, 8 * M, 3e-5), "3": (20e9, 65536, 4, 0.05, 1e6, 8 * M, 3e-5),
          "4": (300e9, 32768, 4, 0.05, 1e6, 8 * M, 1e-5)}


@pytest.mark.parametrize("path,layers_after_1a,params", [("1p4b", 24, 1_434_652_673), ("2p6b", 48, 2_667_974_657)])
def test_ouro_recipe_is_the_spec_table(path, layers_after_1a, params):
  cfg = ouro_recipe(path)
  validate(cfg, 8)  # on 8 devices (fsdp = 8)
  plan = phases.plan(cfg, 8)
  lr = phases.schedule(plan)
  assert [ph.spec.name for ph in plan] == list(STAGES)
  for ph, (tokens, seq, loops, beta, rope, batch, end_lr) in zip(plan, STAGES.values()):
    last = ph.segments[-1].cfg
    assert tokens <= ph.tokens < tokens + batch  # the last step overshoots by less than one batch
    assert (last.train.seq_len, last.model.loop_steps, last.objective.beta, last.model.rope_base) == (
        seq, loops, beta, rope)
    assert last.train.batch_size * last.train.seq_len == batch
    assert math.isclose(float(lr(ph.end)) if ph.index < 4 else ph.lr_end, end_lr, rel_tol=1e-6)
    assert last.model.num_layers == (24 if ph.spec.name == "1a" else layers_after_1a)
  ramp = plan[0].segments
  assert [s.cfg.train.batch_size * 4096 for s in ramp] == [4 * M, 5 * M, 6 * M, 7 * M, 8 * M]
  assert float(lr(0)) == 0.0 and math.isclose(float(lr(1000)), 1.5e-4, rel_tol=1e-6)
  assert count_params(plan[-1].segments[0].cfg.model) == params


# The memory plan (BUILD.md): context parallelism per stage; one sequence per data-parallel shard at a time.
CONTEXT = {"1p4b": {"1a": 2, "1b": 1, "2": 1, "3": 2, "4": 1}, "2p6b": {"1a": 2, "1b": 1, "2": 1, "3": 4, "4": 2}}


@pytest.mark.parametrize("path", ["1p4b", "2p6b"])
@pytest.mark.parametrize("chips", [64, 256])  # v5p-128 and v5p-512: stage 3's 128 sequences < 256 chips
def test_ouro_recipe_memory_plan_holds_on_both_pod_sizes(path, chips):
  plan = phases.plan(ouro_recipe(path), chips)
  for ph in plan:
    last = ph.segments[-1].cfg
    context = CONTEXT[path][ph.spec.name]
    assert (last.mesh.data, last.mesh.fsdp, last.mesh.context, last.mesh.tensor) == (1, -1, context, 1)
    shards = chips // context
    assert last.train.per_device_batch == 1 and last.train.batch_size % shards == 0


def _recipe(**first_phase_overrides):
  """tiny_config on a (2, 2, 2) mesh (4-way data parallel, 4 x 16-token rows) with phases a and b."""
  cfg = tiny_config()
  cfg.train.steps = 0  # the recipe's own length
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  first_phase_overrides.setdefault("name", "a")
  cfg.phases = (phases.phase(steps=4, **first_phase_overrides),
                phases.phase(name="b", steps=4, loop_steps=2, upscale={"layers": 4}))
  return cfg


@pytest.mark.parametrize("overrides,where,problem", [
    ({"batch_tokens": 24}, "config.phases[0] ('a').batch_tokens", "not whole sequences"),
    ({"batch_tokens": 48}, "config.phases[0] ('a'): in this phase config.train.batch_size",
     "not divisible by the data-parallel size"),
    ({"seq_len": 12, "batch_tokens": 48}, "config.phases[0] ('a'): in this phase config.model.loss_chunk",
     "does not divide"),
    ({"tokens": 64}, "config.phases[0] ('a').steps", "exactly one of steps"),
    ({"objective": "elbo"}, "config.phases[0] ('a').objective", "not one of"),
    ({"warmup_steps": 5}, "config.phases[0] ('a').warmup_steps", "exceed the phase"),
    ({"lr_shape": "cosine", "end_lr": 1.0}, "config.phases[0] ('a').lr", "end_lr <= lr"),
    ({"batch_tokens": 128, "batch_ramp_from": 64, "batch_ramp_steps": 8}, "config.phases[0] ('a').steps",
     "inside the 8-step"),
    ({"data_weights": "1,2"}, "config.phases[0] ('a'): in this phase config.data.weights", "2 weights for 1"),
    ({"name": "b"}, "config.phases[0] ('b').name", "used twice"),
])
def test_impossible_recipes_fail_before_anything_runs(overrides, where, problem):
  cfg = _recipe(**overrides)
  if "seq_len" in overrides:
    cfg.model.loss_chunk = 8
  with pytest.raises(ConfigError) as error:
    check_run(cfg, 8)
  message = str(error.value)
  assert message.startswith(where) and problem in message and ". Fix: " in message, message


def test_impossible_upscales_and_gate_phases_name_the_phase():
  cfg = _recipe()
  cfg.phases[1].upscale.layers = 5
  with pytest.raises(ConfigError, match=r"^config.phases\[1\] \('b'\).upscale: from 2 layers: .*multiple.*Fix: "):
    check_run(cfg, 8)
  cfg = _recipe(upscale={"layers": 4})
  with pytest.raises(ConfigError, match=r"^config.phases\[0\] \('a'\).upscale: the first phase"):
    check_run(cfg, 8)
  cfg = _recipe()
  cfg.phases = cfg.phases + (phases.phase(name="g", steps=2, objective="gate", upscale={"layers": 8}),)
  with pytest.raises(ConfigError, match=r"^config.phases\[2\] \('g'\).objective: a gate phase"):
    check_run(cfg, 8)


def test_a_gate_phase_needs_a_model_with_an_exit_gate():
  cfg = _recipe()
  cfg.model.kind, cfg.model.num_kv_heads = "loop_residual", 4
  cfg.phases = (phases.phase(name="a", steps=4), phases.phase(name="g", steps=2, objective="gate"))
  with pytest.raises(ConfigError, match=r"^config.phases\[1\] \('g'\).objective: a loop_residual model has no "
                     r"exit gate.*Fix: "):
    check_run(cfg, 8)


def smoke_expectations():
  """Per global step (1-based, as logged): the settings configs/recipe_smoke.py's table promises.

  Written from the table, independently of loopjax.phases: LR with optax's formulas spelled out.
  """
  rows = []
  def add(n, phase, tokens, seq, loops, beta, rope, layers, lr_fn):
    for k in range(n):
      rows.append(dict(phase=phase, batch_tokens=tokens(k) if callable(tokens) else tokens, seq_len=seq,
                       loop_steps=loops, beta=beta, rope_base=rope, num_layers=layers, lr=lr_fn(k)))
  cosine = lambda a, b, n: (lambda k: b + (a - b) * 0.5 * (1 + math.cos(math.pi * k / n)))
  add(8, "1a", lambda k: [128, 128, 192, 192][k] if k < 4 else 256, 32, 8, 0.1, 1e4, 2,
      lambda k: 3e-3 * min(k / 2, 1.0))
  add(6, "1b", 256, 32, 4, 0.05, 1e4, 4, lambda k: 3e-3)
  add(6, "2", 512, 64, 4, 0.05, 4e4, 4, cosine(3e-3, 3e-4, 6))
  add(4, "3", 1024, 128, 4, 0.05, 1e6, 4, lambda k: 3e-4)
  add(4, "4", 512, 64, 4, 0.05, 1e6, 4, cosine(3e-4, 1e-4, 4))
  add(6, "gate", 512, 64, 4, 0.05, 1e6, 4, lambda k: 3e-3)
  return rows


SMOKE = ["--config", "configs/recipe_smoke.py", f"--compile_cache={ts.SUBPROCESS_CACHE}"]


def run_smoke(workdir):
  os.makedirs(workdir, exist_ok=True)
  with open(workdir + ".log", "a") as log:  # ts.output(workdir) reads it
    return subprocess.Popen([ts.LOOPJAX, "train", *SMOKE, f"--workdir={workdir}"], cwd=ts.REPO, stdout=log,
                            stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("recipe") / "run")
  assert run_smoke(workdir).wait(timeout=600) == 0, ts.output(workdir)[-3000:]
  return workdir


@pytest.mark.slow
def test_smoke_recipe_runs_every_setting_it_promises(smoke_run):
  logged = ts.logged(smoke_run)
  expected = smoke_expectations()
  assert [r["step"] for r in logged] == list(range(1, len(expected) + 1))
  for record, want in zip(logged, expected):
    for key in ("batch_tokens", "seq_len", "loop_steps", "num_layers"):
      assert record[key] == want[key], (record["step"], key, record[key], want)
    for key in ("beta", "rope_base", "lr"):
      assert math.isclose(record[key], want[key], rel_tol=1e-6), (record["step"], key, record[key], want)
    assert len(record["ce_per_step"]) == want["loop_steps"] and math.isfinite(record["loss"])
  with open(os.path.join(smoke_run, "phases.jsonl")) as f:
    events = [json.loads(line) for line in f]
  starts = {e["phase"]: e for e in events if e["event"] == "start"}
  ends = {e["phase"]: e for e in events if e["event"] == "end"}
  assert list(starts) == list(ends) == ["1a", "1b", "2", "3", "4", "gate"]
  step, boundaries = 0, {}
  for name in ends:
    mine = [w for w in expected if w["phase"] == name]
    assert starts[name]["step"] == step and ends[name]["step"] == step + len(mine)
    assert ends[name]["tokens"] == sum(w["batch_tokens"] for w in mine) and ends[name]["wall_seconds"] > 0
    step += len(mine)
    boundaries[step] = name
  kept = {r["step"]: r["phase"] for r in list_checkpoints(os.path.join(smoke_run, "checkpoints")) if r["complete"]}
  assert {s: kept.get(s) for s in boundaries} == boundaries  # every boundary, named, kept beyond checkpoint.keep


@pytest.mark.slow
def test_smoke_recipe_killed_in_its_third_phase_continues_to_the_same_losses(tmp_path, smoke_run):
  workdir = str(tmp_path / "run")
  proc = run_smoke(workdir)
  ts.wait_until(lambda: len(ts.logged(workdir)) >= 17, proc, timeout=600)  # phase "2" is steps 15..20
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert len(ts.logged(workdir)) < 20, "phase 2 ended before the kill"
  assert run_smoke(workdir).wait(timeout=600) == 0, ts.output(workdir)[-3000:]
  assert "resumed from checkpoint step 15" in ts.output(workdir)  # inside phase 2: the data stream resumed
  assert ts.losses(workdir) == ts.losses(smoke_run)


@pytest.mark.slow
def test_smoke_recipe_console_names_each_phase_its_entry_and_each_compile_once(smoke_run):
  """The console narrates (loopjax/train/narration.py): a start and a done line per phase, what each entry
  did, and one compile line per step shape (8 segments, all of other shapes) with its attention core."""
  lines = [line for line in ts.output(smoke_run).splitlines() if line.startswith("loopjax: ")]
  starts = [line for line in lines if re.match(r"loopjax: phase \S+ \(\d/6\) starts at step", line)]
  assert [line.split()[2] for line in starts] == ["1a", "1b", "2", "3", "4", "gate"]
  assert "(batch ramps 4 -> 6 -> 8)" in starts[0] and "on entry" not in starts[0]
  assert starts[1].endswith("T=4, seq 32, batch 8, 4 layers, mesh data=1 fsdp=1 context=1 tensor=1; on entry: "
                            "upscaled 2 -> 4 layers (interleave)")
  assert starts[5].endswith("on entry: gate stage (Stage II): only the exit gate trains")
  done = [line.split()[2] for line in lines if re.match(r"loopjax: phase \S+ done at step \d+: .* tokens in .* s, loss ",
                                                        line)]
  assert done == ["1a", "1b", "2", "3", "4", "gate"]
  compiles = [line for line in lines if "compiled the train step" in line]
  assert len(compiles) == 8 and all("attention native (model.attention=auto)" in line for line in compiles)
  assert not any(line.startswith("loopjax: attention:") for line in lines)
