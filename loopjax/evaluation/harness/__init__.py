"""lm-evaluation-harness for looped models: benchmarks at every loop count T and Q-exit threshold q.

  depth.py        a setting to evaluate at: T loop steps, or Q-exit q at the trained T; flag parsing
  model.py        the parameters on a mesh, with the tokenizer and lengths that go with them
  scorer.py       jitted, batched per-token log-likelihoods of token rows at several depths from one forward
  backend.py      the lm-eval model backend `loopjax` (loglikelihood, rolling, generate_until)
  sweep.py        tasks loaded once, evaluated at every depth in one process: metrics rows and a table
  local_tasks.py  the tasks shipped in tasks/ (made from the synthetic tasks) and how their data loads
  lm_eval_main.py `loopjax-lm-eval`: lm-eval's own command line with the backend registered

lm-eval is the optional `harness` extra; `require_lm_eval` turns its absence into one line.
"""

import importlib.util


class HarnessError(ValueError):
  """A bad harness request (task, setting, tokenizer, missing package); names the flag and the fix."""


def require_lm_eval():
  if importlib.util.find_spec("lm_eval") is None:
    raise HarnessError("lm-evaluation-harness is not installed. Fix: pip install -e '.[harness]' (or "
                       "'loopjax[harness]'), which installs lm-eval")
