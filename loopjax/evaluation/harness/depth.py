"""Where in the loop a benchmark reads the model out: a loop count T, or a Q-exit threshold q.

A looped model has no single score: it can run T = 1, 2, 4, 8 steps (the trained one or others), or
stop each token at its Q-exit step (the first step whose exit CDF reaches q, SPEC section 2). A sweep
evaluates a list of such settings; each names its metrics `.../T<t>` or `.../q<q>`. A threshold is
applied at the model's trained T, as the released Ouro code does.
"""

from typing import NamedTuple

from loopjax.evaluation.harness import HarnessError


class Depth(NamedTuple):
  loop_steps: int  # T: steps run (for Q-exit: the most a token may run)
  exit_threshold: float | None = None  # Q-exit q in (0, 1]; None = every token runs all T steps

  @property
  def label(self) -> str:
    return f"T{self.loop_steps}" if self.exit_threshold is None else f"q{self.exit_threshold:g}"


def check(depth: Depth, what: str) -> Depth:
  """`depth` if T >= 1 and q in (0, 1], else a HarnessError naming `what` (the flag or argument)."""
  if depth.loop_steps < 1:
    raise HarnessError(f"{what}: loop_steps {depth.loop_steps} must be at least 1. Fix: give T >= 1, e.g. the "
                       "trained T or 1,2,4,8")
  if depth.exit_threshold is not None and not 0 < depth.exit_threshold <= 1:
    raise HarnessError(f"{what}: exit threshold {depth.exit_threshold} is outside (0, 1]. Fix: give q such as "
                       "0.5, or none for full depth")
  return depth


def _numbers(text: str, kind, what: str) -> list:
  try:
    return [kind(x) for x in str(text).split(",") if x.strip()]
  except ValueError:
    raise HarnessError(f"{what} {text!r}: not a comma-separated list of numbers. Fix: e.g. 1,2,4,8 for loop "
                       "counts or 0.3,0.5,0.7 for thresholds") from None


def sweep_depths(loop_steps: str, exit_thresholds: str, trained_steps: int,
                 flags: tuple[str, str] = ("--loop_steps", "--exit_thresholds")) -> list[Depth]:
  """Full depth at every T of `loop_steps` ("" = the trained T), then Q-exit at each threshold; `flags`
  name the two settings in errors."""
  counts = _numbers(loop_steps, int, flags[0]) or [trained_steps]
  thresholds = _numbers(exit_thresholds, float, flags[1])
  return [check(Depth(T), flags[0]) for T in counts] + [check(Depth(trained_steps, q), flags[1]) for q in thresholds]
