"""Held-out evaluation at the trained loop count and at others (extrapolation).

For each T in `eval.loop_steps` it reports, averaged over held-out tokens: the CE of every loop step,
the exit-weighted loss sum_t p(t) CE_t, the entropy and expected exit step, and for the synthetic
tasks the exact-match accuracy of every loop step's predictions and of the Q-exit prediction (the
first step whose exit CDF reaches `eval.q_exit`). Looped models are trained at one T and often used
at another, so both directions are measured.

Evaluation batches are the same on every process (the synthetic tasks' held-out sets, or the first
batches of `eval.source`), so each becomes a global array by slicing the full batch per device.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from loopjax import data as data_lib
from loopjax import exits, sharding
from loopjax.data import evaluate as task_eval
from loopjax.data import pipeline, tasks
from loopjax.model.heads import lm_logits, token_cross_entropy

EVAL_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def eval_loop_steps(cfg) -> list[int]:
  """The loop counts to evaluate: `eval.loop_steps` ("1,2,4,8") or just the trained T."""
  text = str(cfg.eval.loop_steps).strip()
  return [int(t) for t in text.split(",")] if text else [cfg.model.loop_steps]


def _eval_data_cfg(cfg):
  data_cfg = cfg.data.copy_and_resolve_references()
  if cfg.eval.source:
    with data_cfg.unlocked():
      data_cfg.source = cfg.eval.source
  return data_cfg


def is_task(cfg) -> bool:
  names = pipeline.source_names(_eval_data_cfg(cfg))
  return len(names) == 1 and names[0] in tasks.TASK_NAMES


def eval_batches(cfg) -> list[dict]:
  """The full (global) held-out batches, identical on every process."""
  data_cfg = _eval_data_cfg(cfg)
  e = cfg.eval
  batch_size = e.batch_size or cfg.train.batch_size
  if is_task(cfg):
    return task_eval.make_eval_batches(data_cfg, seq_len=cfg.train.seq_len, batch_size=batch_size,
                                       num_batches=e.num_batches, seed=e.seed)
  stream = data_lib.make_train_iterator(data_cfg, seq_len=cfg.train.seq_len, global_batch=batch_size, seed=e.seed)
  return list(itertools.islice(stream, e.num_batches))


def to_global(batch: dict, mesh) -> dict:
  """A batch every process holds in full -> global arrays sharded on the batch axes."""
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_callback(batch[k].shape, batch_sharding, lambda index, v=batch[k]: v[index])
          for k in EVAL_KEYS}


def make_eval_step(cfg, graphdef, loop_steps: int):
  """eval_step(params, batch) -> (token-summed metrics, predictions [T,B,S], Q-exit predictions [B,S])."""
  o = cfg.objective

  def eval_step(params, batch):
    model = nnx.merge(graphdef, params)

    def read_out(h_BSD, kernel_DV):
      logits_BSV = lm_logits(h_BSD, kernel_DV)
      return token_cross_entropy(logits_BSV, batch["targets"]), jnp.argmax(logits_BSV, -1).astype(jnp.int32)

    (ce_TBS, pred_TBS), gate_TBS = model.run_steps(
        batch["inputs"], read_out, segment_ids_BS=batch["segment_ids"], positions_BS=batch["positions"],
        loop_steps=loop_steps)
    loss, means = exits.stage1_loss(ce_TBS, gate_TBS, batch["loss_mask"], beta=o.beta, prior=o.prior,
                                    geometric_lambda=o.geometric_lambda)
    tokens = jnp.sum(batch["loss_mask"])
    sums = {k: v * tokens for k, v in dict(means, loss=loss).items()}  # token-weighted, summed over batches
    pred_exit_BS = exits.select_steps(pred_TBS, exits.q_exit_step(gate_TBS, cfg.eval.q_exit))
    return dict(sums, tokens=tokens), pred_TBS, pred_exit_BS

  return eval_step


def evaluate(cfg, graphdef, params, mesh, batches: list[dict]) -> dict:
  """Flat metrics {"eval_T{T}/<name>": value or per-step list} over all `batches`, for every T."""
  results = {}
  score = is_task(cfg)
  with jax.set_mesh(mesh):
    global_batches = [to_global(b, mesh) for b in batches]
    for loop_steps in eval_loop_steps(cfg):
      step = jax.jit(make_eval_step(cfg, graphdef, loop_steps))
      totals, correct_T, correct_exit, questions = None, np.zeros(loop_steps), 0, 0
      for batch, global_batch in zip(batches, global_batches):
        sums, pred_TBS, pred_exit_BS = step(params, global_batch)
        sums = jax.device_get(sums)
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
        if score:
          pred_TBS, pred_exit_BS = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                                    for x in (pred_TBS, pred_exit_BS))
          for t in range(loop_steps):
            correct_T[t] += task_eval.exact_match_counts(pred_TBS[t], batch)[0]
          correct, total = task_eval.exact_match_counts(pred_exit_BS, batch)
          correct_exit, questions = correct_exit + correct, questions + total
      tokens = max(float(totals.pop("tokens")), 1.0)
      prefix = f"eval_T{loop_steps}/"
      for name, value in totals.items():
        mean = np.asarray(value) / tokens
        results[prefix + name] = mean.tolist() if mean.ndim else float(mean)
      if score:
        results[prefix + "exact_match_per_step"] = (correct_T / max(questions, 1)).tolist()
        results[prefix + "exact_match_q_exit"] = correct_exit / max(questions, 1)
  return results


def format_table(results: dict) -> str:
  """One row per evaluated T: exit-weighted loss, expected exit step, per-step CE and exact match."""
  loop_counts = sorted({int(k.split("/")[0][len("eval_T"):]) for k in results})
  lines = [f"{'T':>3} {'loss':>8} {'E[exit]':>8}  ce per step | exact match per step (q-exit)"]
  for T in loop_counts:
    r = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(f"eval_T{T}/")}
    ce = " ".join(f"{x:.3f}" for x in r["ce_per_step"])
    line = f"{T:>3} {r['loss']:>8.4f} {r['expected_exit_step']:>8.2f}  {ce}"
    if "exact_match_per_step" in r:
      em = " ".join(f"{x:.3f}" for x in r["exact_match_per_step"])
      line += f" | {em} ({r['exact_match_q_exit']:.3f})"
    lines.append(line)
  return "\n".join(lines)
