"""Pre-flight: compile the real train step for a TPU topology on this host, before renting the pod.

`loopjax compile --config X --topology v5p:4x4x4 [--phase NAME]` builds the run's mesh over libtpu's compile-only
devices for that topology (no TPU needed, only the `tpu` extra), lowers the same jitted step
`loopjax train` runs (`loopjax.train.trainer.build_trainer`, state shardings from the parameters'
logical axes) on abstract inputs, and compiles it with XLA:TPU. It prints:

  - per-chip memory from `memory_analysis()` (arguments, output, temporaries, code) against the
    chip's HBM, and whether it fits (the exit code is 1 when it does not);
  - the loop-aware training FLOPs per step from `loopjax.model.flops_per_token`, a chip's share of the
    dense and of the attention FLOPs (`loopjax.step_flops`: attention by the query rows each chip's
    kernel runs on, read from the compiled program for splash), and the step time and tokens/s at the
    chips' peak: the 100%-MFU bound, no better;
  - for a staged recipe (`config.phases`), one line per phase (its full-batch segment from
    `loopjax.phases.plan`, on the phase's own mesh): seq, sequences per data-parallel shard at once and
    microbatches, mesh, attention and its query rows per chip, memory, fits, FLOPs per chip (attention
    and dense) and the ideal step time;
  - with `--explain`, the temporaries by what they hold (`loopjax.memory_account`);
  - when it does not fit, the lever that the memory breakdown points at (`advice`).

XLA's `cost_analysis()` is not used: it counts the body of every while loop (each `scan` over loop
steps and layers) once, so for a looped, scanned model its FLOPs come out tens of times too low.
"""

import dataclasses
import importlib.util
import math
import os
import re
import time

import jax

from loopjax import memory_account, metrics, step_flops
from loopjax import phases as phases_lib
from loopjax.config import ConfigError
from loopjax.model import flops_per_token
from loopjax.train import state as state_lib
from loopjax.train.microbatch import num_microbatches
from loopjax.train.trainer import build_trainer, make_mesh

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  kind: str  # key of metrics.PEAK_FLOPS_PER_DEVICE (dense bf16 peak per chip)
  hbm_bytes: int  # nominal HBM per chip
  dims: int  # torus dimensions of the topology name (v4/v5p 3-D, v5e/v6e 2-D)
  cores_per_chip: int  # TensorCores per chip: "v4-128" / "v5p-128" count cores, v5e/v6e count chips
  chip_config: str  # libtpu chip config: "megacore" makes one JAX device per chip


CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 3, 2, "megacore"),
    "v5e": Chip("TPU v5e", 16 * GIB, 2, 1, "default"),
    "v5p": Chip("TPU v5p", 95 * GIB, 3, 2, "megacore"),
    "v6e": Chip("TPU v6e", 32 * GIB, 2, 1, "default"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}

# Slice shapes of the accelerator-type names ("v5p-128"), by chip count, as Cloud TPU builds them.
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


class TopologyError(ValueError):
  """A topology name loopjax cannot turn into a libtpu topology; the message gives accepted forms."""


@dataclasses.dataclass(frozen=True)
class Topology:
  generation: str  # "v4", "v5e", "v5p", "v6e"
  shape: tuple[int, ...]  # chips along each torus axis

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def name(self) -> str:
    return f"{self.generation}:{'x'.join(map(str, self.shape))}"

  @property
  def host_bounds(self) -> tuple[int, int, int]:
    """Chips per host: a 2x2x1 block, except single-host v5e/v6e slices of up to 8 chips."""
    if self.chip.dims == 2 and self.chips <= 8:
      return (*self.shape, 1)
    return tuple(min(b, d) for b, d in zip((2, 2, 1), (*self.shape, 1)))


def parse_topology(name: str) -> Topology:
  """"v5p:4x4x4" (generation:chip grid) or "v5p-128" (Cloud TPU accelerator type) -> Topology."""
  forms = ("GEN:AxBxC for v4/v5p or GEN:AxB for v5e/v6e (e.g. v5p:4x4x4, v5e:4x4), or an accelerator "
           "type GEN-N (e.g. v5p-128, v5e-16; N counts TensorCores for v4/v5p, chips for v5e/v6e)")
  match = re.fullmatch(r"([a-z0-9]+?)(?::([0-9x]+)|-([0-9]+))", name.strip().lower())
  generation = match and ALIASES.get(match.group(1), match.group(1))
  if not match or generation not in CHIPS:
    raise TopologyError(f"--topology={name!r} is not a known TPU topology. Fix: use {forms}; "
                        f"generations: {', '.join(CHIPS)}")
  chip = CHIPS[generation]
  if match.group(2):
    shape = tuple(int(x) for x in match.group(2).split("x") if x)
    if len(shape) != chip.dims or min(shape) < 1:
      raise TopologyError(f"--topology={name!r}: {generation} topologies have {chip.dims} axes. Fix: use {forms}")
    return Topology(generation, shape)
  count = int(match.group(3))
  chips, table = count // chip.cores_per_chip, SHAPES_3D if chip.dims == 3 else SHAPES_2D
  if count % chip.cores_per_chip or chips not in table:
    raise TopologyError(f"--topology={name!r}: no standard {generation} slice of that size. Fix: give the "
                        f"chip grid, e.g. {generation}:{'x'.join(['2'] * chip.dims)}, or one of "
                        f"{', '.join(f'{generation}-{c * chip.cores_per_chip}' for c in table)}")
  return Topology(generation, table[chips])


def topology_devices(topology: Topology) -> list:
  """libtpu's compile-only devices for the topology (needs the `tpu` extra, no TPU)."""
  if importlib.util.find_spec("libtpu") is None:
    raise TopologyError(f"cannot describe TPU topology {topology.name}: libtpu is not installed. Fix: "
                        "install the TPU compiler with `pip install -e \".[tpu]\"` (libtpu 0.0.42.*)")
  # libtpu locks /tmp/libtpu_lockfile so that one process owns the TPU chips; compiling ahead of
  # time touches no chip, so several pre-flights (or a pre-flight beside a CPU run) may share it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.name,
                                      chip_config_name=topology.chip.chip_config,
                                      chips_per_host_bounds=topology.host_bounds, num_slices=1)
  return list(desc.devices)


@dataclasses.dataclass
class Report:
  topology: Topology
  devices: int
  hosts: int
  mesh: dict  # mesh axis name -> size
  attention: str  # the resolved model.attention the step was compiled with
  params: int
  global_batch: int
  seq_len: int
  loop_steps: int
  num_layers: int
  compile_seconds: float
  # per-chip bytes from memory_analysis(); None when XLA refused to compile for lack of memory
  argument_bytes: int | None = None
  output_bytes: int | None = None
  alias_bytes: int | None = None
  temp_bytes: int | None = None
  code_bytes: int | None = None
  oom_message: str = ""  # XLA's out-of-memory error, when compilation itself failed for memory
  splash_in_program: bool = False  # the compiled program calls the Pallas splash-attention kernel
  query_rows: int = 0  # query positions a chip's attention runs on (splash: read from the program)
  microbatches: int = 1  # gradient accumulation (train.per_device_batch)
  account: list | None = None  # [(what, bytes)] of the temporaries (`--explain`, loopjax.memory_account)

  @property
  def total_bytes(self) -> int | None:
    """HBM a chip needs for the step: arguments + outputs not aliased to donated inputs + temporaries + code."""
    if self.argument_bytes is None:
      return None
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

  @property
  def fits(self) -> bool:
    return self.total_bytes is not None and self.total_bytes <= self.topology.chip.hbm_bytes

  @property
  def peak_flops_per_chip(self) -> float:
    return metrics.PEAK_FLOPS_PER_DEVICE[self.topology.chip.kind]

  def flops(self, cfg) -> step_flops.StepFlops:
    return step_flops.step_flops(cfg.model, self.seq_len, self.global_batch * self.seq_len, self.mesh,
                                 self.query_rows)

  def ideal_step_seconds(self, cfg) -> float:
    """The step at the chips' peak: one chip's dense and attention FLOPs over its peak."""
    f = self.flops(cfg)
    return (f.dense_chip + f.attention_chip) / self.peak_flops_per_chip


def run(cfg, topology: Topology, explain: bool = False) -> Report:
  """Compiles the train step for `topology` and measures it (raises ConfigError/TopologyError); with
  `explain`, also accounts for its temporaries from XLA's buffer assignment."""
  devices = topology_devices(topology)
  mesh = make_mesh(cfg, devices)
  trainer = build_trainer(cfg, mesh)
  report = Report(topology, len(devices), len({d.process_index for d in devices}), dict(mesh.shape),
                  trainer.cfg.model.attention, state_lib.count_params(cfg.model), cfg.train.batch_size, cfg.train.seq_len,
                  cfg.model.loop_steps, cfg.model.num_layers, 0.0)
  report.microbatches = num_microbatches(cfg.train.batch_size, cfg.train.per_device_batch,
                                         mesh.shape["data"] * mesh.shape["fsdp"])
  report.query_rows = cfg.train.seq_len // mesh.shape["context"]  # every core splits the queries (per_shard)
  inputs = trainer.abstract_state, trainer.abstract_batch()
  start = time.perf_counter()
  dump, temp_allocation = "", 0
  with jax.set_mesh(mesh):
    lowered = trainer.train_step.lower(*inputs)
    try:
      if explain:
        compiled, dump, temp_allocation = memory_account.compile_with_dump(lowered)
      else:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):  # XLA:TPU's "ran out of memory" at compile time
        raise
      report.oom_message = str(e).strip().splitlines()[0]
      compiled = None
  report.compile_seconds = time.perf_counter() - start
  if compiled is not None:
    mem = compiled.memory_analysis()
    report.argument_bytes, report.output_bytes = mem.argument_size_in_bytes, mem.output_size_in_bytes
    report.alias_bytes, report.temp_bytes = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    report.code_bytes = mem.generated_code_size_in_bytes
    text = compiled.as_text()
    report.splash_in_program = "splash" in text
    report.query_rows = step_flops.splash_query_rows(text) or report.query_rows
    if dump:
      report.account = memory_account.account(dump, temp_allocation, cfg, report.temp_bytes)
  return report


def rows_per_chip(report: Report) -> float:
  """Sequences a data-parallel shard runs at once (data x fsdp shards share the batch, microbatches split
  it further; the chips along context and tensor share each row)."""
  return report.global_batch / (report.mesh["data"] * report.mesh["fsdp"] * report.microbatches)


def rows_text(report: Report) -> str:
  at_once = f"{rows_per_chip(report):g} seq/shard"
  return at_once + (f" x {report.microbatches} microbatches" if report.microbatches > 1 else "")


def advice(report: Report, cfg) -> str:
  """The lever the memory breakdown points at, first match: dense attention scores, partial remat, the
  state (arguments), several sequences per chip, else one sequence's activations (context parallelism)."""
  m, hbm = cfg.model, report.topology.chip.hbm_bytes
  heads = m.num_heads / report.mesh["tensor"]
  scores = max(rows_per_chip(report), 1) * heads * report.seq_len**2 * 4  # one layer's f32 [B, N, S, S]
  if report.attention == "xla" and scores > hbm / 8:
    return (f"attention: the xla core holds [B, N, S, S] scores ({_size(scores).strip()} per chip per layer at "
            f"seq {report.seq_len}); set model.attention=auto (splash on TPU) or blocked, O(S) memory")
  if m.remat != "full":
    return f"remat: model.remat={m.remat} saves more than each layer's input; set model.remat=full"
  state = report.argument_bytes or 12 * report.params / (report.mesh["fsdp"] * report.mesh["tensor"])  # f32 + Adam
  if state > hbm / 2:
    return "state: shard params and optimizer state over more chips (mesh.fsdp, or a larger topology)"
  if rows_per_chip(report) > 1:
    return (f"activations: {rows_per_chip(report):g} sequences per data-parallel shard at once; accumulate "
            "gradients over microbatches (train.per_device_batch=1), or use more data-parallel chips")
  return ("activations of one sequence exceed a chip: context parallelism (mesh.context > 1 splits the sequence "
          "over that many chips of a host), a chip with more HBM, or fewer loop steps per sequence")


def mesh_text(mesh: dict) -> str:
  return " ".join(f"{axis}={size}" for axis, size in mesh.items())


def _size(n: int) -> str:
  return f"{n / GIB:8.2f} GiB" if n >= GIB else f"{n / 2**20:8.2f} MiB"


def format_report(report: Report, cfg, config_name: str = "") -> str:
  r, chip = report, report.topology.chip
  flops_token = flops_per_token(cfg.model, r.seq_len)
  tokens_step = r.global_batch * r.seq_len
  flops_step = flops_token * tokens_step
  f = r.flops(cfg)
  step_seconds = r.ideal_step_seconds(cfg)
  lines = [
      f"loopjax pre-flight: {config_name or 'config'} on {r.topology.name} ({chip.kind}, {r.devices} chips, "
      f"{r.hosts} host{'s' if r.hosts > 1 else ''})",
      f"  model            {cfg.model.kind}, {r.params:,} params, L={r.num_layers} x T={r.loop_steps}, "
      f"seq {r.seq_len}, global batch {r.global_batch} ({rows_text(r)}), "
      f"{cfg.model.compute_dtype} compute, remat {cfg.model.remat}",
      f"  mesh             {mesh_text(r.mesh)}",
      f"  attention        {r.attention} (model.attention={cfg.model.attention}; splash kernel in the program: "
      f"{'yes' if r.splash_in_program else 'no'}; {r.query_rows} of {r.seq_len} queries per chip)",
      f"  compile          {r.compile_seconds:.1f} s (XLA:TPU ahead of time, on this host)",
      "per-chip memory (memory_analysis)",
  ]
  if r.total_bytes is None:
    lines += [f"  XLA refused to compile: {r.oom_message}",
              f"  HBM              {_size(chip.hbm_bytes)}",
              "  fits             NO"]
  else:
    lines += [
        f"  arguments        {_size(r.argument_bytes)}",
        f"  output           {_size(r.output_bytes)}  ({_size(r.alias_bytes).strip()} aliased to donated arguments)",
        f"  temporaries      {_size(r.temp_bytes)}",
        f"  generated code   {_size(r.code_bytes)}",
        f"  total            {_size(r.total_bytes)}  of {chip.hbm_bytes / GIB:.0f} GiB HBM "
        f"({100 * r.total_bytes / chip.hbm_bytes:.1f}%)",
        f"  fits             {'yes' if r.fits else 'NO'}",
    ]
    if r.account:
      lines.append(memory_account.format_account(r.account))
  if not r.fits:
    lines.append(f"  fix              Fix: {advice(r, cfg)}")
  lines += [
      "throughput bound at 100% MFU (loop-aware analytic FLOPs; XLA cost_analysis counts a scan body once, unused)",
      f"  FLOPs/token      {flops_token:.4g}",
      f"  FLOPs/step       {flops_step:.4g}  ({tokens_step:,} tokens; attention {f.attention_step:.4g})",
      f"  per chip         {f.dense_chip + f.attention_chip:.4g}  (dense {f.dense_chip:.4g}, attention "
      f"{f.attention_chip:.4g} on {r.query_rows} of {r.seq_len} queries)",
      f"  peak             {r.peak_flops_per_chip / 1e12:.0f} TFLOP/s per chip (dense bf16) x {r.devices}",
      f"  ideal step time  {step_seconds:.4g} s",
      f"  ideal tokens/s   {tokens_step / step_seconds:,.0f}  ({tokens_step / step_seconds / r.devices:,.0f} per chip)",
  ]
  return "\n".join(lines)


def phase_configs(cfg, chips: int, phase: str | None = None) -> list[tuple[str, object]]:
  """(name, derived config) of each recipe phase (or the one named): its last segment, the full batch
  after any ramp, which is the phase's largest compiled shape. ConfigError for an unknown phase name."""
  plan = phases_lib.plan(cfg, chips)
  names = [ph.spec.name for ph in plan]
  if phase is not None and phase not in names:
    raise ConfigError(f"--phase {phase!r}: not a phase of this recipe. Fix: use one of {', '.join(names)}")
  return [(ph.spec.name, ph.segments[-1].cfg) for ph in plan if phase in (None, ph.spec.name)]


def format_phase_line(name: str, report: Report, cfg) -> str:
  """One recipe phase: seq, sequences per chip, mesh, attention and its queries per chip, memory per chip,
  fits (and the lever), FLOPs per chip (attention and dense) and the ideal step time."""
  memory = (f"{_size(report.total_bytes).strip():>10} of {report.topology.chip.hbm_bytes / GIB:.0f} GiB"
            if report.total_bytes is not None else "XLA refused (out of memory)")
  f = report.flops(cfg)
  line = (f"  phase {name:<6} seq {report.seq_len:>6}  {rows_text(report)}  mesh {mesh_text(report.mesh)}"
          f"  attention {report.attention:<7} on {report.query_rows} queries/chip  {memory}  fits "
          f"{'yes' if report.fits else 'NO'}  FLOPs/chip: attention {f.attention_chip:.3g}, dense "
          f"{f.dense_chip:.3g}  ideal step {report.ideal_step_seconds(cfg):.3g} s  "
          f"(compile {report.compile_seconds:.0f} s)")
  if report.account:
    line += "\n" + "\n".join("    " + row for row in memory_account.format_account(report.account).splitlines())
  return line if report.fits else f"{line}\n      Fix: {advice(report, cfg)}"


def main(cfg, topology_name: str, config_name: str = "", phase: str | None = None, explain: bool = False) -> int:
  """`loopjax compile`: prints the report (a recipe: one line per phase); 0 if every step fits the chip's
  HBM, 1 if not."""
  topology = parse_topology(topology_name)
  if not cfg.phases:
    report = run(cfg, topology, explain)
    print(format_report(report, cfg, config_name), flush=True)
    return 0 if report.fits else 1
  print(f"loopjax pre-flight: recipe {config_name or 'config'} on {topology.name} ({topology.chip.kind}, "
        f"{topology.chips} chips)", flush=True)
  fits = True
  for name, phase_cfg in phase_configs(cfg, topology.chips, phase):
    report = run(phase_cfg, topology, explain)
    print(format_phase_line(name, report, phase_cfg), flush=True)
    fits &= report.fits
  return 0 if fits else 1
