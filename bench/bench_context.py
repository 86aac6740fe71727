"""Context parallelism's cost on CPU: the train step's process CPU time with mesh.context=4 against mesh.data=4.

    python bench/bench_context.py [--impls native,blocked,xla --seq 2048 --rounds 5 --steps 5]

At the same global batch, a context group should do the same attention work as data parallelism, split
along the sequence instead of the batch; a kernel that runs whole on every device of the group shows as
a ratio near the context size. The process gets 4 fake CPU devices; both meshes run the real jitted step
(`common.Bench`) on the same random batch (one document per row: fully causal, the case load balancing
is for), compiled up front, then timed in interleaved rounds (the order rotating each round), so a
change in the machine's load moves both sides of a ratio alike. CPU time counts every thread of this
process, which on a shared machine is far less noisy than wall time. Model: width 64 (2 heads of 32),
1 layer, T=1, vocab 256, batch 4, float32.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import argparse  # noqa: E402

import common  # noqa: E402
from loopjax.config import default_config  # noqa: E402


def context_config(attention: str, seq: int, mesh: str):
  c = default_config()
  m = c.model
  m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads = 256, 64, 1, 2, 2
  m.head_dim, m.mlp_dim, m.loop_steps, m.attention = 32, 172, 1, attention
  c.train.batch_size, c.train.seq_len = 4, seq
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = (4, 1, 1, 1) if mesh == "data" else (1, 1, 4, 1)
  return c


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--impls", default="native,blocked,xla")
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5, help="steps per round and cell")
  args = parser.parse_args()
  cells = {}
  for impl in args.impls.split(","):
    for mesh in ("data", "context"):
      bench = common.Bench(context_config(impl, args.seq, mesh))
      compiled, _, _ = bench.compile(bench.cfg, bench.state)
      state, _, _ = common.time_steps(compiled, bench.fresh_state(), bench.batch, 1)  # warm-up
      cells[impl, mesh] = dict(bench=bench, compiled=compiled, state=state, cpu=[], wall=[])
  labels = list(cells)
  for r in range(args.rounds):
    for label in labels[r % len(labels):] + labels[:r % len(labels)]:
      c = cells[label]
      c["state"], wall, cpu = common.time_steps(c["compiled"], c["state"], c["bench"].batch, args.steps)
      c["wall"].append(wall)
      c["cpu"].append(cpu)
  rows = []
  for impl in args.impls.split(","):
    data, context = cells[impl, "data"], cells[impl, "context"]
    ratios = [b / a for a, b in zip(data["cpu"], context["cpu"])]
    rows.append((impl, f"{common.median(data['cpu']):.3f}", f"{common.median(context['cpu']):.3f}",
                 f"{common.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
                 f"{common.median(data['wall']):.3f}", f"{common.median(context['wall']):.3f}"))
  print(common.machine_line())
  common.print_table(f"seq {args.seq}, width 64, 1 layer, T=1, batch 4, 4 CPU devices; median of {args.rounds} "
                     f"interleaved rounds of {args.steps} steps",
                     ("attention", "data=4 CPU s/step", "context=4 CPU s/step", "ratio (per-round range)",
                      "data=4 wall s", "context=4 wall s"), rows)


if __name__ == "__main__":
  main()
