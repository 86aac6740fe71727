"""Everything that scores a model, one file per way of scoring (BUILD.md, "Evaluation").

  heldout.py         which data held-out evaluation reads (`eval.source`, else the corpora's validation
                     splits, else the training source)
  teacher_forced.py  held-out loss, CE and exact match of every loop step, at several T, from one forward
                     (`loopjax eval`, training's `eval.every_steps`)
  exact_match.py     the synthetic tasks' held-out batches and the exact-match score of predicted ids
  generation.py      the synthetic tasks' answers generated with Q-exit: exact match vs depth actually run
                     (`loopjax eval --generate`)
  harness/           lm-evaluation-harness: a model backend for loopjax checkpoints, sweeps over T and
                     Q-exit thresholds, local tasks (`loopjax eval --harness`, `eval.harness_tasks`)

Modules import what they need themselves; this package imports nothing, so the CLI stays fast.
"""
