"""What each part of the train step costs in wall time: the step timed with that part taken out.

    python bench/ablate_step.py                          # the peer shape (bench/common.py), T=4
    python bench/ablate_step.py --config small --rounds 3
    python bench/ablate_step.py --set remat=save_attention_core --rounds 7

`bench/profile_step.py` attributes a `jax.profiler` trace, but tracing inflates what it measures (the
peer step took 1,836 ms traced against 1,150 untraced on 2026-12-02, and a standalone 2048x256x256
matmul 1,180 us against about 650), so its figures are shares, not costs. This script asks the other
question: how much faster is the real jitted step (`build_trainer`) without one part? Each variant
replaces one model function while it is traced and compiled, so the compiled step simply lacks it:

  attention core   softmax(q k^T) v -> v + 1e-30 (q + k): elementwise, and q and k stay live, so their
                   projections and RoPE stay in the step (with v alone XLA drops them as dead code,
                   which charged their matmuls to the core: 634 ms against 507 in two noisy runs, 2026-12-03)
  LM head + CE     each step's CE -> mean_D(h) * kernel[0, 0] (h and the kernel still get gradients)
  RMSNorms         w * x / rms(x) -> w * x
  RoPE             identity

These are measurement hacks: the loss they train is meaningless, and they exist only in this process.
All variants share one initial state and batch, are compiled up front and are timed in interleaved
rounds (the order rotating), each cell the median round, so the VM's drift hits all of them alike.
"""

import argparse
import contextlib

import jax
import jax.numpy as jnp

import common
from loopjax.model import attention, base, layers


def _core_is_v(q_BSNH, k_BSKH, v_BSKH, mask, compute_dtype):
  group = q_BSNH.shape[2] // v_BSKH.shape[2]
  return jnp.repeat(v_BSKH, group, axis=2) + 1e-30 * (q_BSNH + jnp.repeat(k_BSKH, group, axis=2))


def _ce_is_mean(h_BSD, kernel_DV, targets_BS, chunk, save_logit_grads):
  return jnp.mean(h_BSD, axis=-1) * kernel_DV[0, 0]


ABLATIONS = {
    "as configured": (),
    "without the attention core": ((attention, "core", _core_is_v),),
    "without the LM head + CE": ((base, "lm_cross_entropy", _ce_is_mean),),
    "without the RMSNorms": ((layers, "rms_norm", lambda x, w, eps: x * w.astype(x.dtype)),),
    "without RoPE": ((layers, "apply_rope", lambda x, cos, sin: x),),
}


@contextlib.contextmanager
def replaced(patches):
  """The (module, name, function) replacements in place for the duration (tracing and compiling)."""
  saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
  for module, name, fn in patches:
    setattr(module, name, fn)
  try:
    yield
  finally:
    for module, name, fn in saved:
      setattr(module, name, fn)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="peer", help="configs/<name>.py, or 'peer'")
  parser.add_argument("--set", action="append", default=[],
                      help="model overrides, e.g. --set remat=save_attention_core --set loop_steps=1")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the variants")
  parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
  args = parser.parse_args()
  cfg = common.with_overrides(common.load_config(args.config), args.set)
  bench = common.Bench(cfg, devices=jax.devices()[:1])
  cells = {}
  for label, patches in ABLATIONS.items():
    with replaced(patches):
      compiled, _, _ = bench.compile(cfg, bench.state)
    state, _, _ = common.time_steps(compiled, bench.fresh_state(), bench.batch, 2)
    cells[label] = dict(compiled=compiled, state=state, wall=[], cpu=[])
  labels = list(cells)
  for r in range(args.rounds):
    for label in labels[r % len(labels):] + labels[:r % len(labels)]:
      c = cells[label]
      c["state"], wall, cpu = common.time_steps(c["compiled"], c["state"], bench.batch, args.steps)
      c["wall"].append(wall)
      c["cpu"].append(cpu)
  configured = common.median(cells["as configured"]["wall"])
  rows = []
  for label, c in cells.items():
    wall = common.median(c["wall"])
    rows.append((label, f"{1e3 * wall:,.0f}", common.spread(c["wall"]), f"{1e3 * common.median(c['cpu']):,.0f}",
                 f"{1e3 * (configured - wall):,.0f}", f"{100 * (configured - wall) / configured:.0f}%"))
  print(common.machine_line())
  overrides = f"; set {', '.join(args.set)}" if args.set else ""
  common.print_table(f"{args.config} (T={cfg.model.loop_steps}, remat {cfg.model.remat}{overrides}): the step "
                     f"without each part, {args.rounds} interleaved rounds",
                     ("step", "wall ms", "spread", "CPU ms", "part's wall ms", "share"), rows)


if __name__ == "__main__":
  main()
