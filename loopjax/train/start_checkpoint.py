"""`loopjax import-hf`: a run's starting state, saved as its first checkpoint (step 0) before any step.

The state is the one `loopjax train` would start from (`init_from.initial_state`: init.from_hf's
weights in the run's dtype and shardings, a fresh optimizer state) and the checkpoint is the driver's
own (`Runner.save`: resolved config, phase, checksums, the data stream's state), so `loopjax train` on
the workdir resumes from it like from any checkpoint, and `loopjax upscale` and `loopjax export-hf`
read it like any other.
"""

import os

from loopjax.checkpoint import CheckpointError
from loopjax.checkpoint_files import complete_steps
from loopjax.train.driver import Runner, make_checkpointer
from loopjax.train.hooks import StepInfo
from loopjax.train.init_from import check_init


def write_start_checkpoint(cfg, workdir: str) -> str:
  """Saves the step-0 state of `cfg`'s run in `workdir` (which must have no checkpoint); returns its path.

  The init source is checked before anything is created, so a bad source leaves `workdir` untouched.
  """
  directory = os.path.join(workdir, "checkpoints")
  if complete_steps(directory):
    raise CheckpointError(f"{directory} already holds checkpoints. Fix: give a new --workdir (training there "
                          "continues from its newest checkpoint, not from the import)")
  check_init(cfg)
  runner = Runner(cfg, workdir)
  ckpt = make_checkpointer(cfg, workdir)
  try:
    state, tally, _, stream = runner.restore(ckpt)
    segment = runner.plan[0].segments[0]
    trainer = runner.trainer(segment)
    info = StepInfo(0, state, {}, tally, trainer, runner.rows(segment, stream), segment.end, False)
    runner.save(ckpt, info)
  finally:
    ckpt.close()
  return os.path.join(directory, "0")
