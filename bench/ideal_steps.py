"""A recipe's per-stage ideal step times from the pre-flight's FLOP count, without compiling anything.

    python bench/ideal_steps.py [--config configs/ouro_recipe.py:1p4b --topology v5p-128]

For each phase at its full batch, on its own mesh (`preflight.phase_configs`): a chip's dense FLOPs and
its attention FLOPs (`loopjax.step_flops`) with the attention's query rows split over the context group
(S / context per chip, what every attention core runs on since issue 30; `loopjax compile` reads splash's
from the compiled program) and with every chip of a context group on the whole sequence (S rows: the
kernels before issue 30), and the ideal step time of each at the chips' dense bf16 peak. Only phases with
mesh.context > 1 differ. `loopjax compile --phase NAME` gives the same "now" figure and the memory.
"""

import argparse

from loopjax import config as config_lib
from loopjax import metrics, preflight, step_flops

import common


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="configs/ouro_recipe.py:1p4b")
  parser.add_argument("--topology", default="v5p-128")
  args = parser.parse_args()
  cfg = config_lib.load_config_file(args.config)
  topology = preflight.parse_topology(args.topology)
  peak = metrics.PEAK_FLOPS_PER_DEVICE[topology.chip.kind]
  rows = []
  for name, phase_cfg in preflight.phase_configs(cfg, topology.chips):
    mesh = dict(zip(("data", "fsdp", "context", "tensor"), config_lib.validate(phase_cfg, topology.chips)))
    S, tokens = phase_cfg.train.seq_len, phase_cfg.train.batch_size * phase_cfg.train.seq_len
    now, before = (step_flops.step_flops(phase_cfg.model, S, tokens, mesh, rows_per_chip)
                   for rows_per_chip in (S // mesh["context"], S))
    seconds = lambda f: (f.dense_chip + f.attention_chip) / peak
    rows.append((name, f"{S:,}", phase_cfg.model.loop_steps, mesh["context"], f"{now.dense_chip:.3g}",
                 f"{before.attention_chip:.3g}", f"{now.attention_chip:.3g}", f"{seconds(before):.3f}",
                 f"{seconds(now):.3f}", f"{seconds(before) / seconds(now):.2f}x"))
  common.print_table(f"{args.config} on {topology.name}: FLOPs per chip per step and ideal step time at "
                     f"{peak / 1e12:.0f} TFLOP/s per chip",
                     ("phase", "seq", "T", "context", "dense/chip", "attention/chip before", "attention/chip now",
                      "ideal step before (s)", "ideal step now (s)", "before / now"), rows)


if __name__ == "__main__":
  main()
