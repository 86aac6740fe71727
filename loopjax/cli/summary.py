"""The closing lines of `loopjax train`: where everything went and how the run ended.

A run's last screen should answer the next questions without opening a file: did it finish, what
loss, how the exit gate spreads its mass over the loop steps, and where metrics, TensorBoard and the
checkpoint to continue from are.
"""

from loopjax.train.result import RunResult


def format_summary(result: RunResult) -> str:
  m = result.last_metrics
  head = f"loopjax: {'preempted' if result.preempted else 'finished'} at step {result.step}"
  if "loss" in m:
    head += f", loss {m['loss']:.4f}"
  if result.preempted:
    head += " (saved; exit code 75: the same command continues the run)"
  lines = [head, *_exits(m)]
  lines += [f"  metrics      {result.metrics_path}", f"  tensorboard  {result.tensorboard_dir}",
            f"  checkpoint   {result.checkpoint_dir or 'none'}"]
  return "\n".join(lines)


def _exits(metrics: dict) -> list[str]:
  """The exit distribution line, for models with an exit gate (Loop-Residual has none)."""
  if not metrics.get("exit_probs"):
    return []
  line = "  exit p(t)    " + " ".join(f"{p:.2f}" for p in metrics["exit_probs"])
  if "expected_exit_step" in metrics:
    line += f"  (expected exit step {metrics['expected_exit_step']:.2f})"
  return [line]
