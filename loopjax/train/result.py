"""What a training run hands back to its caller (the CLI prints it as the run's closing summary)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class RunResult:
  workdir: str
  step: int  # the optimizer step the run ended at
  last_metrics: dict  # the last logged metrics (loss, exit_probs, expected_exit_step, ...); {} if none
  metrics_path: str  # WORKDIR/metrics.jsonl
  tensorboard_dir: str  # WORKDIR/tensorboard
  checkpoint_dir: str | None  # the newest checkpoint's directory, None if there is none
  preempted: bool  # ended by SIGTERM/SIGINT (after saving), not by reaching the last step
