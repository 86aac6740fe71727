"""`loopjax compile`: topology names, and a real XLA:TPU ahead-of-time compile of the train step.

The compile tests need libtpu (the `tpu` extra) and are skipped without it. Each one compiles a
small model for a 1- or 4-chip topology in a subprocess (10-30 s on 2 cores).
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from loopjax import metrics
from loopjax.config import load_config_file
from loopjax.model import flops_per_token
from loopjax.preflight import CHIPS, GIB, Topology, TopologyError, parse_topology
from loopjax.train.state import count_params

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LOOPJAX = os.path.join(os.path.dirname(sys.executable), "loopjax")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed: pip install -e '.[tpu]' (libtpu 0.0.42.*)")


@pytest.mark.parametrize("name, generation, shape", [
    ("v5p:4x4x4", "v5p", (4, 4, 4)),
    ("v5p-128", "v5p", (4, 4, 4)),  # accelerator types count TensorCores on v4/v5p: 64 chips
    ("v4-8", "v4", (2, 2, 1)),
    ("v5e-16", "v5e", (4, 4)),  # ... and chips on v5e/v6e
    ("v5litepod-256", "v5e", (16, 16)),
    ("v6e:2x4", "v6e", (2, 4)),
])
def test_topology_names(name, generation, shape):
  assert parse_topology(name) == Topology(generation, shape)


@pytest.mark.parametrize("name, message", [
    ("v7:2x2", "not a known TPU topology"),
    ("v5p:4x4", "v5p topologies have 3 axes"),
    ("v5e-12", "no standard v5e slice of that size"),
])
def test_bad_topology_names_say_what_is_accepted(name, message):
  with pytest.raises(TopologyError, match="Fix:") as e:
    parse_topology(name)
  assert message in str(e.value)


def _compile(*args: str) -> tuple[int, str]:
  proc = subprocess.run([LOOPJAX, "compile", "--config", "configs/smoke.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS=""))
  return proc.returncode, proc.stdout


def _field(report: str, name: str) -> str:
  match = re.search(rf"^  {name}\s+(.*)$", report, re.MULTILINE)
  assert match, report
  return match.group(1)


def _mib(text: str) -> float:
  value, unit = text.split()[:2]
  return float(value) * (1024 if unit == "GiB" else 1)


# D and head_dim multiples of 128, so TPU tile padding does not blur the byte counts.
SMALL = ["--config.model.hidden_size=512", "--config.model.mlp_dim=1024", "--config.model.num_heads=4",
         "--config.model.num_kv_heads=2", "--config.model.head_dim=128", "--config.model.vocab_size=512",
         "--config.mesh.data=1", "--config.mesh.fsdp=4"]


@needs_libtpu
def test_small_config_fits_a_small_topology():
  """Memory comes from XLA's analysis of the real step: with FSDP over 4 chips each chip holds a
  quarter of params + Adam's two moments (12 bytes/param), donated so the output aliases it.
  FLOPs come from loopjax's loop-aware count, not XLA's (which counts each scan body once)."""
  code, report = _compile("--topology", "v5e:2x2", *SMALL)
  assert code == 0, report
  assert _field(report, "fits") == "yes"
  assert _field(report, "mesh") == "data=1 fsdp=4 context=1 tensor=1"
  cfg = load_config_file(os.path.join(REPO, "configs", "smoke.py"))
  for override in SMALL:
    key, value = override.removeprefix("--config.").split("=")
    section, name = key.split(".")
    cfg[section][name] = int(value)
  state_mib = 12 * count_params(cfg.model) / 2**20 / 4
  assert state_mib <= _mib(_field(report, "arguments")) <= state_mib * 1.01 + 0.1
  assert _mib(_field(report, "output").split("(")[1]) == pytest.approx(_mib(_field(report, "output")), abs=0.01)
  flops_step = flops_per_token(cfg.model, cfg.train.seq_len) * cfg.train.batch_size * cfg.train.seq_len
  assert float(_field(report, "FLOPs/step").split()[0]) == pytest.approx(flops_step, rel=1e-3)
  ideal = flops_step / (4 * metrics.PEAK_FLOPS_PER_DEVICE[CHIPS["v5e"].kind])
  assert float(_field(report, "ideal step time").split()[0]) == pytest.approx(ideal, rel=1e-3)


@needs_libtpu
def test_too_big_a_model_does_not_fit_and_exits_nonzero():
  """~1.7B parameters with fp32 Adam state (~20 GB) on one 16 GiB v5e chip."""
  code, report = _compile("--topology", "v5e:1x1", "--config.model.hidden_size=8192",
                          "--config.model.mlp_dim=28672", "--config.model.num_heads=64",
                          "--config.model.head_dim=128", "--config.model.num_kv_heads=2")
  assert code == 1, report
  assert _field(report, "fits") == "NO"
  refused = re.search(r"XLA refused to compile: .*RESOURCE_EXHAUSTED", report)
  assert refused or _mib(_field(report, "total")) > 16 * GIB / 2**20, report
  assert "Fix:" in _field(report, "fix")


def _compile_long(seq_len: int) -> str:
  code, report = _compile("--topology", "v5e:2x2", *SMALL[:-2], "--config.model.hidden_size=256",
                          "--config.model.mlp_dim=512", "--config.model.num_layers=1", "--config.model.loop_steps=2",
                          "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.train.batch_size=4",
                          f"--config.train.seq_len={seq_len}")
  assert code == 0, report
  return report


@needs_libtpu
def test_long_sequences_compile_splash_attention_with_linear_memory():
  """`auto` is splash on TPU: the kernel is in the compiled program and per-chip memory grows about
  linearly with the sequence (1024 -> 2048: ratio < 2.5). The xla core at these sizes holds [1, 4, S, S]
  float32 scores per layer, 16 MiB at 2048, and grows about 4x (temporaries 691 MB at 4096)."""
  short, long = _compile_long(1024), _compile_long(2048)
  for report in (short, long):
    assert _field(report, "attention").startswith("splash (model.attention=auto; splash kernel in the program: yes")
  assert _mib(_field(long, "total")) < 2.5 * _mib(_field(short, "total")), (short, long)


@pytest.mark.slow
@needs_libtpu
def test_context_parallel_splash_runs_each_chip_on_its_own_queries():
  """Context 2 of 4 chips at seq 1024: in the compiled program splash's forward takes 512 queries per call
  (q_seq_shards; it took all 1024, the attention of every chip repeated, before issue 30), and a chip's
  attention FLOPs are the step's over the 4 chips, not over the 2 data-parallel shards."""
  overrides = [*SMALL[:-2], "--config.model.hidden_size=256", "--config.model.mlp_dim=512",
               "--config.model.num_layers=1", "--config.model.loop_steps=2", "--config.mesh.data=1",
               "--config.mesh.fsdp=2", "--config.mesh.context=2", "--config.train.batch_size=2",
               "--config.train.seq_len=1024"]
  code, report = _compile("--topology", "v5e:2x2", *overrides)
  assert code == 0, report
  assert _field(report, "attention").endswith("splash kernel in the program: yes; 512 of 1024 queries per chip)")
  cfg = load_config_file(os.path.join(REPO, "configs", "smoke.py"))
  for override in overrides:
    key, value = override.removeprefix("--config.").split("=")
    section, name = key.split(".")
    cfg[section][name] = int(value)
  attention = (flops_per_token(cfg.model, 1024) - flops_per_token(cfg.model, 0)) * 2 * 1024
  per_chip = re.search(r"attention (\S+) on 512 of 1024 queries", _field(report, "per chip"))
  assert per_chip and float(per_chip.group(1)) == pytest.approx(attention / 4, rel=1e-3), report


@pytest.mark.slow
@needs_libtpu
def test_explain_accounts_for_the_temporaries_and_microbatches_shrink_them():
  """--explain splits the temporaries by what they hold, summing to memory_analysis' figure; with 2
  microbatches of 1 row per chip, the saved layer inputs are T x L x 1 x S x D float32 exactly."""
  T, L, S, D = 4, 2, 2048, 512  # every dimension distinct (vocab 384, mlp 1024), so shapes say what they hold
  code, report = _compile("--topology", "v5e:2x2", *SMALL, "--config.model.vocab_size=384", f"--config.model.num_layers={L}",
                          f"--config.model.loop_steps={T}", f"--config.train.seq_len={S}", "--config.train.batch_size=8",
                          "--config.train.per_device_batch=1", "--explain")
  assert code == 0, report
  assert "global batch 8 (1 seq/shard x 2 microbatches)" in report
  rows = dict(re.findall(r"^  (\S[\w' ()-]+?)\s+(-?[\d.]+ [MG]iB)\s+[-\d.]+%$", report, re.MULTILINE))
  assert _mib(rows["saved layer inputs"]) == pytest.approx(T * L * S * D * 4 / 2**20, abs=0.01), report
  assert sum(map(_mib, rows.values())) == pytest.approx(_mib(_field(report, "temporaries")), abs=0.05), report


@needs_libtpu
def test_context_groups_stay_within_a_host_of_a_pod():
  """v5p hosts hold 2 x 2 chips: context 4 over a 4x4x4 torus is laid out host by host (each process
  feeds whole rows), context 2 keeps the torus-aware layout, and context 8 cannot fit a host."""
  script = """
import sys
from loopjax.config import ConfigError, load_config_file
from loopjax.preflight import parse_topology, topology_devices
from loopjax.train.trainer import make_mesh
devices = topology_devices(parse_topology("v5p-128"))
for context in (2, 4, 8):
  cfg = load_config_file("configs/smoke.py")
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.context, cfg.train.batch_size = 1, 64 // context, context, 64 // context
  try:
    mesh = make_mesh(cfg, devices)
  except ConfigError as e:
    print(context, "error", str(e).split(":")[0])
    continue
  groups = mesh.devices.reshape(-1, context)  # context is the 3rd of 4 axes, tensor = 1
  print(context, "hosts per group", max(len({d.process_index for d in g}) for g in groups), len(groups))
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS=""))
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert lines == ["2 hosts per group 1 32", "4 hosts per group 1 16", "8 error config.mesh.context"], proc.stdout
