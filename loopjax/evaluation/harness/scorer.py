"""Per-token log-likelihoods of token rows at several depths from one jitted forward, batched on a mesh.

Every lm-eval log-likelihood request (a multiple-choice option, a rolling window) becomes a row: its
tokens, of which the last `span` are scored. Loop step t of a forward does not depend on how many steps
follow, so one forward at the deepest T of a sweep gives every shallower T's scores, and the Q-exit
thresholds' too (each token read out at its own exit step). The scorer therefore returns, per row,
one (log-likelihood, greedy, steps run) per depth, and a sweep runs each row once.

Shapes stay few: rows are sorted by length and cut into batches of `batch_rows` rows (a multiple of
the data-parallel shards; the last batch filled with empty rows), each padded on the right to a power
of two >= 16 (at most the model's max length), so a task compiles once per length bucket. Padding
comes after a row's tokens and attention is causal, so it never changes them. Each loop step's
logits of a batch, batch_rows x length x vocab in float32, are held at once: `batch_rows` bounds
the memory (a 49K vocabulary at 32 rows x 2048 is 13 GB, split over the data-parallel devices).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from loopjax import exits, sharding
from loopjax.model.heads import lm_logits, token_cross_entropy
from loopjax.train.state import model_graph

MIN_BUCKET = 16


class Row(NamedTuple):
  tokens: tuple[int, ...]  # inputs then the last target: the model reads tokens[:-1], predicts tokens[1:]
  span: int  # how many of the last targets are scored (1..len(tokens) - 1)


class Score(NamedTuple):
  loglikelihood: float  # sum of the scored tokens' log-probabilities
  greedy: bool  # every scored token is its step's argmax
  steps: int  # loop steps the scored tokens were read out at, summed (span * T at full depth)


def bucket(length: int, max_len: int) -> int:
  return min(max_len, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


def make_score_fn(model_cfg, depths):
  """score(params, inputs_BS, targets_BS) -> (loglik_DBS, greedy_DBS, step_DBS) for each depth (T, q).

  One forward at the deepest T; depth (T, None) reads every token at step T, depth (T, q) at its
  Q-exit step over the first T steps' gates (`exits.q_exit_step`, steps counted from 1 on output).
  """
  graphdef = model_graph(model_cfg)[0]
  forward_steps = max(d.loop_steps for d in depths)

  def score(params, inputs_BS, targets_BS):
    model = nnx.merge(graphdef, params)

    def read_out(h_BSD, kernel_DV):
      logits_BSV = lm_logits(h_BSD, kernel_DV)
      return -token_cross_entropy(logits_BSV, targets_BS), jnp.argmax(logits_BSV, -1) == targets_BS

    (loglik_TBS, greedy_TBS), gate_TBS = model.run_loop(
        inputs_BS, read_out, segment_ids_BS=jnp.ones_like(inputs_BS), loop_steps=forward_steps)
    picked = []
    for depth in depths:
      T, q = depth
      step_BS = (jnp.full(inputs_BS.shape, T - 1, jnp.int32) if q is None
                 else exits.q_exit_step(gate_TBS[:T], q).astype(jnp.int32))
      picked.append((exits.select_steps(loglik_TBS, step_BS), exits.select_steps(greedy_TBS, step_BS), step_BS + 1))
    return tuple(jnp.stack(x) for x in zip(*picked))

  return score


class Scorer:
  """Rows -> one Score per depth, for any parameters of one model config (compiled once per shape)."""

  def __init__(self, model_cfg, mesh, depths, *, batch_rows: int, max_len: int):
    self.mesh, self.depths, self.max_len = mesh, list(depths), max_len
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    self.batch_rows = -(-max(batch_rows, 1) // shards) * shards
    self._score = jax.jit(make_score_fn(model_cfg, self.depths))

  def __call__(self, params, rows: list[Row]) -> list[list[Score]]:
    """Per row (in the given order), one Score per depth of `self.depths`."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
    out = [None] * len(rows)
    with jax.set_mesh(self.mesh):
      for start in range(0, len(order), self.batch_rows):
        chunk = order[start:start + self.batch_rows]
        for i, scores in zip(chunk, self._batch(params, [rows[i] for i in chunk])):
          out[i] = scores
    return out

  def _batch(self, params, rows: list[Row]) -> list[list[Score]]:
    width = bucket(max(len(r.tokens) - 1 for r in rows), self.max_len)
    tokens_BS1 = np.zeros((self.batch_rows, width + 1), np.int32)
    for b, row in enumerate(rows):
      tokens_BS1[b, :len(row.tokens)] = row.tokens
    batch_sharding = sharding.batch_sharding(self.mesh)
    inputs_BS, targets_BS = (jax.make_array_from_callback((self.batch_rows, width), batch_sharding,
                                                          lambda index, v=v: v[index])
                             for v in (tokens_BS1[:, :-1], tokens_BS1[:, 1:]))
    loglik_DBS, greedy_DBS, step_DBS = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                                        for x in self._score(params, inputs_BS, targets_BS))
    scores = []
    for b, row in enumerate(rows):
      end = len(row.tokens) - 1
      scored = slice(end - row.span, end)
      scores.append([Score(float(loglik_DBS[d, b, scored].astype(np.float64).sum()),
                           bool(greedy_DBS[d, b, scored].all()), int(step_DBS[d, b, scored].sum()))
                     for d in range(len(self.depths))])
    return scores
