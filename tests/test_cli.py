"""The `loopjax` executable: one argparse scheme for every command, one-line errors, quiet logs.

The subprocess tests run the installed entry point, so they check what a user types; none of them
trains except `test_train_prints_a_summary_and_no_library_info_logs`.
"""

import os
import subprocess
import sys

import pytest

from conftest import SUBPROCESS_CACHE
from loopjax.cli import COMMANDS, config_args, logs
from loopjax.cli.summary import format_summary
from loopjax.config import ConfigError, default_config
from loopjax.train.result import RunResult

LOOPJAX = os.path.join(os.path.dirname(sys.executable), "loopjax")
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FLAGS = {
    "train": ["--config", "--workdir", "--compile_cache", "--coordinator", "--num_processes", "--process_id",
              "--local_devices", "--initialization_timeout", "--verbose"],
    "eval": ["--checkpoint", "--hf", "--step", "--data", "--loop_steps", "--output", "--generate", "--questions",
             "--harness", "--include_path", "--exit_thresholds", "--limit", "--tokenizer", "--batch_size",
             "--compile_cache"],
    "generate": ["--checkpoint", "--hf", "--prompt", "--prompts_file", "--step", "--tokenizer", "--max_new_tokens",
                 "--loop_steps", "--exit_threshold", "--kv_cache", "--temperature", "--top_k", "--top_p", "--seed",
                 "--eos_ids", "--max_len", "--batch_size", "--output", "--compile_cache"],
    "prepare": ["--output", "--tokenizer", "--text_field", "--txt_separator", "--bos_token", "--on_bad_record",
                "--validation_fraction", "--chunk_tokens", "--runner"],
    "checkpoints": ["workdir"],
    "upscale": ["--from", "--to", "--layers", "--mapping", "--moments", "--step"],
    "import-hf": ["--hf", "--config", "--workdir"],
    "export-hf": ["--checkpoint", "--step", "--output", "--dtype", "--tokenizer", "--overwrite", "--max_shard_size"],
    "compile": ["--config", "--topology"],
    "params": ["--config", "--config.a.b=VALUE"],
    "config": ["--config", "--keys"],
    "plot": ["WORKDIR", "--output", "--dpi"],
}


def run_all(*argvs: list[str]) -> list[subprocess.CompletedProcess]:
  """Runs `loopjax ARGV` for each argv, all at once (each start-up imports JAX: seconds).

  JAX_PLATFORMS=cpu: the test extra installs libtpu, whose start-up lines on a machine without a TPU
  would reach stderr whenever its lock file is free; what these tests check is loopjax's own output.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([LOOPJAX, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env) for argv in argvs]
  results = []
  for argv, proc in zip(argvs, procs):
    out, err = proc.communicate(timeout=120)
    results.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
  return results


def test_every_command_has_help_listing_its_flags():
  assert sorted(FLAGS) == sorted(COMMANDS)
  for result in run_all(*([name, "--help"] for name in FLAGS)):
    name = result.args[0]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: loopjax {name}")
    for flag in FLAGS[name]:
      assert flag in result.stdout, (name, flag)


def test_no_or_unknown_command_lists_the_commands():
  none, unknown, helped = run_all([], ["nope"], ["--help"])
  for result in (none, unknown):
    assert result.returncode == 2
    assert all(name in result.stderr for name in COMMANDS)
  assert "unknown command 'nope'" in unknown.stderr
  assert helped.returncode == 0 and "commands:" in helped.stdout


def _one_line_error(result) -> str:
  assert result.returncode == 2, result.stdout + result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  return lines[0]


SMOKE = ["--config", "configs/smoke.py"]


def test_usage_errors_are_one_line_naming_the_flag():
  unknown, bad_type, bad_key, bad_int, no_config, missing = run_all(
      ["train", *SMOKE, "--workdir", "/nonexistent", "--foo"],
      ["params", *SMOKE, "--config.model.loop_steps=abc"],
      ["params", *SMOKE, "--config.model.nope=1"],
      ["upscale", "--from", "a", "--to", "b", "--layers", "x"],
      ["params", "--config", "configs/nope.py"],
      ["checkpoints", "/nonexistent", "--config.train.steps=3"])
  assert _one_line_error(unknown) == ("loopjax train: error: unrecognized argument --foo "
                                      "(`loopjax train --help` lists the flags)")
  assert _one_line_error(bad_type).startswith("loopjax params: --config.model.loop_steps=abc: not a whole number")
  line = _one_line_error(bad_key)
  assert "--config.model.nope: no such config key" in line and "Fix:" in line
  assert "--layers" in _one_line_error(bad_int)
  assert "no config file" in _one_line_error(no_config)
  assert "--config.train.steps" in _one_line_error(missing)


def test_params_prints_the_count_with_overrides_in_order():
  plain, overridden = run_all(["params", *SMOKE],
                              ["params", *SMOKE, "--config.model.num_layers", "8", "--config.model.num_layers=4"])
  assert plain.returncode == 0 and overridden.returncode == 0, plain.stderr + overridden.stderr
  assert total(overridden.stdout) > total(plain.stdout) > 0
  assert plain.stderr == ""
  assert [line.split()[0] for line in plain.stdout.splitlines()] == [
      "parameters", "embed", "exit_gate", "final_norm", "lm_head", "stack"]  # the total, then by part
  assert total(plain.stdout) == sum(int(line.split()[-1].replace(",", "")) for line in plain.stdout.splitlines()[1:])


def total(params_output: str) -> int:
  """The total of `loopjax params` (its first line: "parameters  103,041")."""
  return int(params_output.splitlines()[0].split()[1].replace(",", ""))


def test_version_and_config_print_what_a_run_would_use():
  version, resolved, keys = run_all(["--version"], ["config", *SMOKE, "--config.train.steps=7"], ["config", "--keys"])
  assert version.returncode == 0 and version.stdout.startswith("loopjax 0.")
  assert "train.steps = 7\n" in resolved.stdout and 'data.source = "multihop"\n' in resolved.stdout
  assert keys.returncode == 0 and len(keys.stdout.splitlines()) == len(resolved.stdout.splitlines())
  step_timeout = next(line for line in keys.stdout.splitlines() if line.startswith("train.step_timeout "))
  assert "0.0  # Watchdog" in step_timeout and "exits 76" in step_timeout


def test_train_prints_a_summary_and_no_library_info_logs(tmp_path):
  (result,) = run_all(["train", *SMOKE, "--workdir", str(tmp_path), f"--compile_cache={SUBPROCESS_CACHE}",
                       "--config.train.steps=4", "--config.train.seq_len=64", "--config.train.progress=false",
                       "--config.optim.warmup_steps=1", "--config.optim.decay_steps=2"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("loopjax: finished at step 4, loss ")
  for part in ("exit p(t)", "expected exit step", "metrics.jsonl", "tensorboard", "checkpoints/4"):
    assert part in result.stdout
  assert "loopjax: no checkpoint in" in result.stderr  # loopjax's own INFO stays on
  assert "absl" not in result.stderr and "BasePyTreeCheckpointHandler" not in result.stderr


@pytest.mark.parametrize("raw, kind, value", [
    ("true", bool, True), ("TRUE", bool, True), ("1", bool, True), ("False", bool, False), ("0", bool, False),
    ("4", int, 4), ("3", float, 3.0), ("1e-3", float, 1e-3), ("a,b", str, "a,b"), ("(1, 2)", tuple, (1, 2)),
    ("None", type(None), None),
])
def test_values_parse_by_the_field_type(raw, kind, value):
  parsed = config_args.parse_value(raw, kind)
  assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("raw, kind", [("yes", bool), ("2", bool), ("4.5", int), ("x", float), ("(1,", tuple)])
def test_unparsable_values_say_what_the_type_takes(raw, kind):
  with pytest.raises(ValueError):
    config_args.parse_value(raw, kind)


def test_overrides_are_split_from_argv_in_order():
  argv = ["--workdir", "w", "--config.a.b=1", "--config.c", "x y", "pos", "--", "--config.d=2"]
  rest, overrides = config_args.split_overrides(argv)
  assert rest == ["--workdir", "w", "pos", "--", "--config.d=2"]
  assert overrides == [("a.b", "1"), ("c", "x y")]
  with pytest.raises(ConfigError, match="--config.c needs a value"):
    config_args.split_overrides(["--config.c"])


def test_config_spec_with_arg_and_overrides(tmp_path):
  path = tmp_path / "sized.py"
  path.write_text("from loopjax.config import default_config\n\n"
                  "def get_config(layers='2'):\n  c = default_config()\n  c.model.num_layers = int(layers)\n"
                  "  return c\n")
  cfg = config_args.load(f"{path}:6", [("optim.lr", "3"), ("train.progress", "False"), ("model.num_layers", "5")])
  assert cfg.model.num_layers == 5 and cfg.optim.lr == 3.0 and cfg.train.progress is False
  assert config_args.load(str(path), []).model.num_layers == 2
  with pytest.raises(AttributeError):
    cfg.model.new_key = 1  # still locked


@pytest.mark.parametrize("key, raw, message", [
    ("model.num_layer", "2", "did you mean --config.model.num_layers?"),
    ("nosection.x", "2", "no such config key"),
    ("model", "2", "is a section"),
    ("model.loop_steps", "2.5", "not a whole number"),
    ("phases", "5", "a tuple key cannot hold this value"),
])
def test_bad_overrides_name_the_flag_and_fix(key, raw, message):
  cfg = default_config()
  with pytest.raises(ConfigError, match="Fix:") as error:
    config_args.apply_override(cfg, key, raw)
  assert str(error.value).startswith(f"--config.{key}") and message in str(error.value)


def test_verbose_is_found_before_argparse_runs():
  assert logs.verbose_requested(["--config", "x", "-v"]) and logs.verbose_requested(["--verbose"])
  assert not logs.verbose_requested(["--config", "x", "--", "-v"])


def _result(**changes) -> RunResult:
  fields = dict(workdir="w", step=30, last_metrics={"loss": 3.84351, "exit_probs": [0.12, 0.2, 0.31, 0.37],
                                                    "expected_exit_step": 2.93},
                metrics_path="w/metrics.jsonl", tensorboard_dir="w/tensorboard", checkpoint_dir="w/checkpoints/30",
                preempted=False)
  return RunResult(**{**fields, **changes})


def test_summary_names_outputs_loss_and_exit_distribution():
  text = format_summary(_result())
  assert text.splitlines()[0] == "loopjax: finished at step 30, loss 3.8435"
  assert "exit p(t)    0.12 0.20 0.31 0.37  (expected exit step 2.93)" in text
  assert "w/metrics.jsonl" in text and "w/tensorboard" in text and "w/checkpoints/30" in text
  preempted = format_summary(_result(preempted=True, last_metrics={}, checkpoint_dir=None))
  assert preempted.startswith("loopjax: preempted at step 30 (saved") and "checkpoint   none" in preempted


def test_cpu_collectives_wait_for_a_starved_device_unless_the_user_set_the_limit(monkeypatch):
  """The raised XLA:CPU rendezvous limit is added to XLA_FLAGS, a user's own value is kept, and this jaxlib
  accepts the flag (an unknown XLA flag aborts every process at backend start)."""
  from loopjax.cli import runtime
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  runtime.patient_cpu_collectives()
  assert os.environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {runtime.CPU_COLLECTIVE_TERMINATE_FLAG}=1800"
  mine = f"{runtime.CPU_COLLECTIVE_TERMINATE_FLAG}=5"
  monkeypatch.setenv("XLA_FLAGS", mine)
  runtime.patient_cpu_collectives()
  assert os.environ["XLA_FLAGS"] == mine
  monkeypatch.delenv("XLA_FLAGS")
  runtime.patient_cpu_collectives()
  psum = ("import jax, numpy as np; jax.config.update('jax_num_cpu_devices', 4); "
          "m = jax.make_mesh((4,), ('d',)); x = jax.device_put(np.arange(4.), jax.NamedSharding(m, jax.P('d'))); "
          "print(float(jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, 'd'), mesh=m, in_specs=jax.P('d'), "
          "out_specs=jax.P()))(x)[0]))")
  done = subprocess.run([sys.executable, "-c", psum], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0 and done.stdout.strip() == "6.0", done.stderr[-2000:]
