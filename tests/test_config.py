"""Every config that cannot work fails at start-up with one message naming the field and the fix."""

import os
import subprocess
import sys

import pytest

from helpers import tiny_config
from loopjax.config import ConfigError, load_config_file, validate
from loopjax.train.driver import check_run
from loopjax.train.state import count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_file(name):
  return load_config_file(os.path.join(ROOT, "configs", name))


@pytest.mark.parametrize("name,expected", [("ouro_1p4b.py", 1_434_652_673), ("ouro_2p6b.py", 2_667_974_657)])
def test_ouro_parameter_counts_are_exact(name, expected):
  assert count_params(config_file(name).model) == expected


def test_loop_residual_gpt2_is_81m():
  assert 81_000_000 <= count_params(config_file("loop_residual_gpt2.py").model) < 82_000_000


@pytest.mark.parametrize("name", ["smoke.py", "small.py", "ouro_1p4b.py", "ouro_2p6b.py", "loop_residual_gpt2.py"])
def test_shipped_configs_validate(name):
  cfg = config_file(name)
  devices = 8 if cfg.train.batch_size % 8 == 0 else 1
  validate(cfg, devices)


BAD = [
    # (overrides as (section, key, value), devices, field named in the error, words of the fix)
    ([("model", "num_kv_heads", 3)], 1, "config.model.num_kv_heads", "divides num_heads"),
    ([("model", "kind", "loop_residual"), ("model", "num_heads", 5), ("model", "num_kv_heads", 5)], 1,
     "config.model.num_heads", "hidden_size"),
    ([("train", "batch_size", 6)], 8, "config.train.batch_size", "multiple of 8"),
    ([("mesh", "data", 3)], 8, "config.mesh", "product"),
    ([("mesh", "data", 2), ("mesh", "fsdp", 2), ("mesh", "tensor", 1)], 8, "config.mesh", "8"),
    ([("mesh", "data", -1), ("mesh", "fsdp", -1)], 8, "config.mesh", "at most one"),
    ([("mesh", "data", 1), ("mesh", "tensor", -1)], 8, "config.model.num_heads", "mesh.tensor"),
    ([("model", "remat", "sometimes")], 1, "config.model.remat", "one of"),
    ([("mesh", "data", 1), ("mesh", "context", 8), ("train", "seq_len", 24)], 8, "config.mesh.context",
     "multiple of 2 x mesh.context"),  # the load-balanced order cuts the sequence into 2 x context chunks
    ([("mesh", "data", 4), ("mesh", "context", 2), ("model", "loss_chunk", 16)], 8, "config.model.loss_chunk",
     "train.seq_len / mesh.context"),  # each device chunks its own 8 of the 16 positions
    ([("model", "loss_chunk", 5)], 1, "config.model.loss_chunk", "divisor"),
    ([("objective", "beta", -1.0)], 1, "config.objective.beta", "non-negative"),
    ([("model", "vocab_size", 16)], 1, "config.model.vocab_size", "vocab"),
    ([("data", "source", "/nonexistent/corpus")], 1, "config.data.source", "prepare"),
]


@pytest.mark.parametrize("overrides,devices,field,fix", BAD, ids=[b[2] + ":" + b[3] for b in BAD])
def test_bad_config_names_field_and_fix(overrides, devices, field, fix):
  cfg = tiny_config()
  for section, key, value in overrides:
    cfg[section][key] = value
  with pytest.raises(ConfigError) as error:
    check_run(cfg, devices)
  message = str(error.value)
  assert message.startswith(field) and "Fix:" in message and fix in message.split("Fix:")[1] + message, message


@pytest.mark.parametrize("name", ["smoke.py", "small.py", "recipe_smoke.py", "ouro_recipe.py:2p6b"])
def test_shipped_configs_shorten_to_40_steps(name):
  """`--config.train.steps=40` alone works on every shipped config: the schedule (or recipe) follows."""
  cfg = config_file(name)
  cfg.train.steps = 40
  devices = 8 if cfg.train.batch_size % 8 == 0 else 1
  plan = check_run(cfg, devices)
  assert plan.total_steps == 40 and plan.notes, plan.notes
  assert float(plan.schedule(0)) == 0.0 and float(plan.schedule(20)) > 0  # warmup, then training


def test_long_warmup_and_decay_shrink_with_a_note():
  cfg = tiny_config()
  cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.decay_steps = 10, 10, 30
  plan = check_run(cfg, 1)
  assert plan.notes == ("optim: warmup 10 + decay 30 steps do not fit train.steps=10; scaled to warmup 2 + "
                        "decay 7",)
  lr = [float(plan.schedule(s)) for s in range(11)]
  assert lr[2] == pytest.approx(cfg.optim.lr) and lr[10] == pytest.approx(cfg.optim.end_lr)  # warmup 2, decay 7


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "loopjax.cli", *args], capture_output=True, text=True, cwd=ROOT,
                        timeout=120)


def test_unknown_key_is_rejected_before_anything_runs():
  result = run_cli("params", "--config", "configs/smoke.py", "--config.model.num_layer=3")
  assert result.returncode != 0
  assert "num_layer" in result.stderr


def test_config_overrides_reach_the_run():
  result = run_cli("params", "--config", "configs/smoke.py", "--config.model.num_layers=4")
  assert result.returncode == 0, result.stderr
  small = run_cli("params", "--config", "configs/smoke.py")
  total = lambda out: int(out.splitlines()[0].split()[1].replace(",", ""))  # "parameters  103,041"
  assert total(result.stdout) > total(small.stdout)
