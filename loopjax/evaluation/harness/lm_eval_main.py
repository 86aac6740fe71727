"""`loopjax-lm-eval`: lm-eval's own command line, with the `loopjax` model backend registered.

    loopjax-lm-eval run --model loopjax --model_args checkpoint=runs/smoke,loop_steps=4 \
        --tasks multihop_mc --include_path loopjax/evaluation/harness/tasks

lm-eval finds a backend from another package through an `lm_eval.models` entry point only from the
release after 0.4.13 (its plugin guide); pyproject.toml declares one, so with such a release plain
`lm_eval run --model loopjax ...` works. 0.4.13 looks names up in its own table alone, so this command
imports the backend (whose decorator registers it) and hands the arguments to lm-eval unchanged.
"""

import sys

from loopjax.cli import errors
from loopjax.evaluation.harness import require_lm_eval


def _run() -> int:
  require_lm_eval()
  from lm_eval.__main__ import cli_evaluate

  from loopjax.evaluation.harness import backend  # noqa: F401 - registers `--model loopjax`
  cli_evaluate()
  return 0


def main():
  sys.exit(errors.reported("lm-eval", _run))
