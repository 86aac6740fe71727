"""Where the train step's time goes, by op class: a jax.profiler trace of the real step, attributed.

    python bench/profile_step.py --config peer           # the peer-figure shape (bench/common.py)
    python bench/profile_step.py --config small --steps 2

The real jitted train step (`build_trainer`) runs a few untimed steps, then `--steps` steps under
`jax.profiler`. Every XLA op the trace records (per thread, so the times add up to CPU time, not wall
time) is attributed through the compiled HLO: its kind (a matmul if its fusion holds a `dot`, a
transpose/copy if it only moves data, else elementwise) and the named scope of its instructions
(loopjax names them: attention/core, attention (the q/k/v/o projections), mlp, norm, lm_head,
exit_gate, optimizer), and whether it runs in the forward pass, the backward pass or a remat
recomputation. Printed as a Markdown table of CPU ms per step and shares.

Read the shares, not the milliseconds: tracing inflates what it measures (the peer step took 1,836 ms
traced against 1,150 untraced on 2026-12-02, a 2048x256x256 matmul 1,180 us against about 650).
`bench/ablate_step.py` gives each part's cost in untraced wall time.
"""

import argparse
import collections
import glob
import os
import re
import tempfile

import jax
from jax.profiler import ProfileData

import common

SCOPES = (("optimizer", "optimizer"), ("lm_head", "LM head + CE"), ("exit_gate", "exit gate"),
          ("attention/core", "attention core"), ("attention", "attention projections"), ("mlp", "MLP"),
          ("norm", "norms"))
CONTAINERS = ("while", "call", "conditional")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? (\w[\w-]*)\((.*)$")
_COMPUTATION = re.compile(r"^%(\S+) ")


def parse_hlo(text: str) -> tuple[dict, dict]:
  """(instruction name -> (opcode, op_name, called computation), computation -> [(opcode, op_name)])."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    if (m := _COMPUTATION.match(line)) and line.rstrip().endswith("{"):
      current = m.group(1)
      continue
    if not (m := _INSTRUCTION.match(line)):
      continue
    name, opcode, rest = m.groups()
    op_name = (re.search(r'op_name="([^"]*)"', rest) or [None, ""])[1]
    calls = (re.search(r"calls=%([\w.-]+)", rest) or [None, None])[1]
    instructions[name] = (opcode, op_name, calls)
    computations[current].append((opcode, op_name))
  return instructions, computations


def classify(name: str, instructions: dict, computations: dict) -> str | None:
  """"<kind>: <scope> (<pass>)" of one traced op, or None for containers and runtime bookkeeping."""
  if name not in instructions:
    return None
  opcode, op_name, calls = instructions[name]
  if opcode in CONTAINERS:
    return None
  body = computations.get(calls, [(opcode, op_name)])
  dots = [n for op, n in body if op in ("dot", "convolution")]
  if dots:
    kind, op_name = "matmul", dots[0]
  elif all(op in ("copy", "transpose", "bitcast", "parameter", "reshape", "broadcast") for op, _ in body):
    kind = "transpose/copy"
  else:
    kind = "elementwise"
  scope = next((label for key, label in SCOPES if f"/{key}/" in f"{op_name}/"), "other")
  phase = ("recompute" if "rematted_computation" in op_name else "backward" if "transpose(jvp" in op_name
           else "forward")
  return f"{kind}: {scope} ({phase})"


def trace_step(cfg, steps: int, directory: str):
  """Compiles the step, warms it, traces `steps` steps; (compiled HLO text, trace file)."""
  bench = common.Bench(cfg)
  compiled, _, _ = bench.compile(cfg, bench.state)
  state, _, _ = common.time_steps(compiled, bench.fresh_state(), bench.batch, 2)
  jax.profiler.start_trace(directory)
  common.time_steps(compiled, state, bench.batch, steps)
  jax.profiler.stop_trace()
  return compiled.as_text(), glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)[-1]


def op_times(trace_file: str) -> collections.Counter:
  """Traced op name -> total ns over the XLA worker threads."""
  plane = ProfileData.from_file(trace_file).find_plane_with_name("/host:CPU")
  times = collections.Counter()
  for line in plane.lines:
    if line.name.startswith("tf_XLA"):
      for event in line.events:
        times[event.name] += event.duration_ns
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="peer", help="configs/<name>.py, or 'peer'")
  parser.add_argument("--steps", type=int, default=3, help="traced steps")
  parser.add_argument("--set", action="append", default=[], help="model overrides, e.g. --set loop_steps=1")
  args = parser.parse_args()
  cfg = common.with_overrides(common.load_config(args.config), args.set)
  with tempfile.TemporaryDirectory() as directory:
    hlo, trace_file = trace_step(cfg, args.steps, directory)
    times = op_times(trace_file)
  instructions, computations = parse_hlo(hlo)
  by_class = collections.Counter()
  for name, ns in times.items():
    if (label := classify(name, instructions, computations)) is not None:
      by_class[label] += ns / args.steps / 1e6
  total = sum(by_class.values())
  kinds = collections.Counter()
  for label, ms in by_class.items():
    kinds[label.split(":")[0]] += ms
  print(common.machine_line())
  common.print_table(f"{args.config} ({', '.join(args.set) or 'as configured'}): CPU ms per step by op class, "
                     f"{total:,.0f} ms in all", ("op class", "CPU ms/step", "share"),
                     [(label, f"{ms:,.1f}", f"{100 * ms / total:.1f}%") for label, ms in by_class.most_common()
                      if ms >= 0.002 * total])
  common.print_table("by kind", ("kind", "CPU ms/step", "share"),
                     [(k, f"{ms:,.1f}", f"{100 * ms / total:.1f}%") for k, ms in kinds.most_common()])


if __name__ == "__main__":
  main()
