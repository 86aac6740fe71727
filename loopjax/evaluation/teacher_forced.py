"""Teacher-forced held-out evaluation at the trained loop count and at others (extrapolation).

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
from jax.sharding import NamedSharding

from loopjax import checkpoint
from loopjax import config as config_lib
from loopjax import data as data_lib
from loopjax import exits, sharding
from loopjax.data.validate import validate_data
from loopjax.evaluation import exact_match
from loopjax.evaluation.heldout import eval_data_cfg, eval_source, is_task
from loopjax.model.heads import lm_logits, token_cross_entropy
from loopjax.train import state as state_lib
from loopjax.train.trainer import make_mesh

EVAL_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def eval_loop_steps(cfg) -> list[int]:
  """The loop counts to evaluate: `eval.loop_steps` ("1,2,4,8") or just the trained T."""
  text = str(cfg.eval.loop_steps).strip()
  return [int(t) for t in text.split(",")] if text else [cfg.model.loop_steps]


def eval_batches(cfg) -> list[dict]:
  """The full (global) held-out batches, identical on every process."""
  data_cfg = eval_data_cfg(cfg)
  e = cfg.eval
  batch_size = e.batch_size or cfg.train.batch_size
  if is_task(cfg):
    return exact_match.make_eval_batches(data_cfg, seq_len=cfg.train.seq_len, batch_size=batch_size,
                                       num_batches=e.num_batches, seed=e.seed)
  stream = data_lib.make_train_iterator(data_cfg, seq_len=cfg.train.seq_len, global_batch=batch_size, seed=e.seed)
  return list(itertools.islice(stream, e.num_batches))


def to_global(batch: dict, mesh) -> dict:
  """A batch every process holds in full -> global arrays sharded on the batch axes."""
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_callback(batch[k].shape, batch_sharding, lambda index, v=batch[k]: v[index])
          for k in EVAL_KEYS}


def make_eval_step(cfg, loop_steps: int):
  """eval_step(params, batch) -> (token-summed metrics, predictions [T,B,S], Q-exit predictions [B,S]).

  The model is `cfg.model` run for `loop_steps` loop steps (any T, not only the trained one).
  """
  o = cfg.objective
  graphdef, _ = state_lib.model_graph(cfg.model)

  def eval_step(params, batch):
    model = nnx.merge(graphdef, params)

    def read_out(h_BSD, kernel_DV):
      logits_BSV = lm_logits(h_BSD, kernel_DV)
      return token_cross_entropy(logits_BSV, batch["targets"]), jnp.argmax(logits_BSV, -1).astype(jnp.int32)

    (ce_TBS, pred_TBS), gate_TBS = model.run_loop(
        batch["inputs"], read_out, segment_ids_BS=batch["segment_ids"], positions_BS=batch["positions"],
        loop_steps=loop_steps)
    loss, means = exits.stage1_loss(ce_TBS, gate_TBS, batch["loss_mask"], beta=o.beta, prior=o.prior,
                                    geometric_lambda=o.geometric_lambda)
    tokens = jnp.sum(batch["loss_mask"])
    sums = {k: v * tokens for k, v in dict(means, loss=loss).items()}  # token-weighted, summed over batches
    pred_exit_BS = exits.select_steps(pred_TBS, exits.q_exit_step(gate_TBS, cfg.eval.q_exit))
    return dict(sums, tokens=tokens), pred_TBS, pred_exit_BS

  return eval_step


class Evaluator:
  """Held-out batches placed on the mesh and one jitted eval step per T, built once per run."""

  def __init__(self, cfg, mesh, batches: list[dict] | None = None):
    self.cfg, self.mesh = cfg, mesh
    self.batches = eval_batches(cfg) if batches is None else batches
    if not self.batches:
      raise config_lib.ConfigError(
          f"config.eval.source: {eval_source(cfg)!r} yields no held-out batch of "
          f"{cfg.eval.batch_size or cfg.train.batch_size} "
          f"rows (too few documents for its {cfg.data.num_shards or 'default'} data shards). Fix: hold out more "
          "documents, or lower data.num_shards or eval.batch_size")
    self.score = is_task(cfg)
    with jax.set_mesh(mesh):
      self.global_batches = [to_global(b, mesh) for b in self.batches]
    self.steps = {T: jax.jit(make_eval_step(cfg, T)) for T in eval_loop_steps(cfg)}

  def __call__(self, params) -> dict:
    """Flat metrics {"eval_T{T}/<name>": value or per-step list} over all batches, for every T."""
    results = {}
    with jax.set_mesh(self.mesh):
      for loop_steps, step in self.steps.items():
        results.update(self._evaluate(params, loop_steps, step))
    return results

  def _evaluate(self, params, loop_steps: int, step) -> dict:
    totals, correct_T, correct_exit, questions = None, np.zeros(loop_steps), 0, 0
    for batch, global_batch in zip(self.batches, self.global_batches):
      sums, pred_TBS, pred_exit_BS = step(params, global_batch)
      sums = jax.device_get(sums)
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
      if self.score:
        pred_TBS, pred_exit_BS = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                                  for x in (pred_TBS, pred_exit_BS))
        for t in range(loop_steps):
          correct_T[t] += exact_match.exact_match_counts(pred_TBS[t], batch)[0]
        correct, total = exact_match.exact_match_counts(pred_exit_BS, batch)
        correct_exit, questions = correct_exit + correct, questions + total
    tokens = max(float(totals.pop("tokens")), 1.0)
    prefix = f"eval_T{loop_steps}/"
    results = {}
    for name, value in totals.items():
      mean = np.asarray(value) / tokens
      results[prefix + name] = mean.tolist() if mean.ndim else float(mean)
    if self.score:
      results[prefix + "exact_match_per_step"] = (correct_T / max(questions, 1)).tolist()
      results[prefix + "exact_match_q_exit"] = correct_exit / max(questions, 1)
    return results


def evaluate_checkpoint(checkpoint_dir: str, *, step: int | None = None, source: str = "",
                        loop_steps: str = "") -> tuple[int, dict]:
  """(step, results) for the parameters of a checkpoint, with the run's own saved config.

  `source` and `loop_steps` override eval.source and eval.loop_steps. Parameters are restored onto
  a data-parallel mesh over all devices.
  """
  step, meta = checkpoint.read_meta(checkpoint_dir, step)
  cfg = config_lib.config_from_dict(meta["config"])
  if source:
    cfg.eval.source = source
  if loop_steps:
    cfg.eval.loop_steps = loop_steps
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.context, cfg.mesh.tensor = -1, 1, 1, 1
  mesh = make_mesh(cfg)
  validate_data(cfg)
  _, abstract = state_lib.model_graph(cfg.model)
  target = jax.tree.map(lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec)),
                        nnx.to_pure_dict(abstract), state_lib.param_specs(cfg.model))
  restored = checkpoint.restore_params(checkpoint_dir, target, step=step)
  return restored.step, Evaluator(cfg, mesh)(restored.items["params"])


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
