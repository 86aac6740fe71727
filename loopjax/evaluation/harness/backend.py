"""The lm-evaluation-harness model backend `loopjax`: a loopjax checkpoint or HF Ouro directory, at one depth.

    lm_eval run --model loopjax --model_args checkpoint=runs/smoke,loop_steps=4 --tasks ...
    (with lm-eval 0.4.13: loopjax-lm-eval run ..., see lm_eval_main.py)

Model arguments: checkpoint=WORKDIR (local or gs://) or hf=DIR; step=N; tokenizer=byte|PATH (default:
the run's, or the HF directory's tokenizer.json); loop_steps=T (default: the trained T; any T, more
than trained included); exit_threshold=q (Q-exit at T); max_length=N (default: the run's
train.seq_len, or max_position_embeddings); add_bos_token=true|false; kv_cache=full|last|first|mean
(generation); batch_size=N (rows per forward, also lm-eval's --batch_size).

Conventions are lm-eval's HF backend's (`lm_eval/models/huggingface.py`; BUILD.md lists where they
differ). Above all, a context starts with the tokenizer's document-start token by default
(add_bos_token=true), because every document loopjax trains on does. Continuations: the pair is encoded whole and split
after the context's tokens (trailing context spaces move to the continuation); an empty context is the
start token alone. Too long: context + continuation keep their last max_length + 1 tokens. Rolling
log-likelihoods use lm-eval's disjoint windows with the start token as prefix. generate_until: the
context keeps its last max_length - max_gen_toks tokens, the KV-cached decoder (early exit that skips
steps) generates, and the text is cut at the first stop sequence (the task's `until` and the EOS text).
`depth_tally` holds, per task, the loop steps the scored or generated tokens ran and their count.
"""

import collections
import json

import jax
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from loopjax.evaluation.harness import HarnessError
from loopjax.evaluation.harness import model as model_lib
from loopjax.evaluation.harness.depth import Depth, check
from loopjax.evaluation.harness.scorer import Row, Scorer
from loopjax.infer import decode, generator, inputs
from loopjax.infer.sampling import Sampling

DEFAULT_BATCH_ROWS = 32
DEFAULT_GEN_TOKENS = 256  # lm-eval's default max_gen_toks


class DepthLM(TemplateLM):
  """The lm-eval API over one model at one depth. `memo` (row -> scores at every depth of `scorer`)
  may be shared by the DepthLMs of one sweep, so each row runs one forward for all of them."""

  def __init__(self, model: model_lib.HarnessModel, depth: Depth, scorer: Scorer, memo: dict | None = None, *,
               add_bos_token: bool = True, kv_cache: str = "full"):
    super().__init__()
    self.model, self.depth, self.scorer = model, depth, scorer
    self.memo = {} if memo is None else memo
    self.add_bos_token, self.kv_cache = add_bos_token, kv_cache
    self.depth_tally = collections.defaultdict(lambda: [0, 0])  # task -> [loop steps run, tokens]
    self._row_steps = []  # (steps, tokens) per request of the last _loglikelihood_tokens call

  @property
  def max_length(self) -> int:
    return self.model.max_len

  @property
  def eot_token_id(self) -> int:
    return self.model.eos_ids[0] if self.model.eos_ids else self.prefix_token_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.model.tokenizer.bos_id
    if bos is None and not self.model.eos_ids:
      raise HarnessError("the tokenizer has no document-start token and the model no EOS id, so an empty "
                         "context has nothing to start from. Fix: use a tokenizer with a start token")
    return self.model.eos_ids[0] if bos is None else bos

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    ids = self.model.tokenizer.encode_batch([string])[0].tolist()
    start = self.add_bos_token if add_special_tokens is None else add_special_tokens
    return [self.prefix_token_id] + ids if start else ids

  def tok_decode(self, ids: list[int]) -> str:
    return self.model.tokenizer.decode(ids)

  def _scores(self, rows: list[Row]) -> list:
    """This depth's Score of every row, running the rows not yet scored at any depth."""
    new = list(dict.fromkeys(r for r in rows if r not in self.memo))
    if new:
      self.memo.update(zip(new, self.scorer(self.model.params, new)))
    index = self.scorer.depths.index(self.depth)
    return [self.memo[r][index] for r in rows]

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    rows = []
    for _, context_enc, continuation_enc in requests:
      if len(continuation_enc) > self.max_length:
        raise HarnessError(f"a continuation of {len(continuation_enc)} tokens is longer than max_length "
                           f"{self.max_length}. Fix: raise max_length (model argument) or shorten the task's answers")
      rows.append(Row(tuple((context_enc + continuation_enc)[-(self.max_length + 1):]), len(continuation_enc)))
    scores = self._scores(rows)
    self._row_steps = [(s.steps, r.span) for s, r in zip(scores, rows)]
    return [(s.loglikelihood, s.greedy) for s in scores]

  def _tally(self, requests, steps_and_tokens):
    for request, (steps, tokens) in zip(requests, steps_and_tokens):
      tally = self.depth_tally[request.task_name]
      tally[0], tally[1] = tally[0] + steps, tally[1] + tokens

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    results = super().loglikelihood(requests, disable_tqdm=True)
    self._tally(requests, self._row_steps)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows = [[make_disjoint_window(w) for w in get_rolling_token_windows(
        self.tok_encode(request.args[0], add_special_tokens=False), prefix_token=self.prefix_token_id,
        max_seq_len=self.max_length, context_len=1)] for request in requests]
    flat = [Row(tuple(context + continuation), len(continuation)) for ws in windows for context, continuation in ws]
    scores = iter(self._scores(flat))
    totals, steps = [], []
    for ws in windows:
      mine = [next(scores) for _ in ws]
      totals.append(sum(s.loglikelihood for s in mine))
      steps.append((sum(s.steps for s in mine), sum(len(c) for _, c in ws)))
    self._tally(requests, steps)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Per group of equal generation settings, one `generate_ids` call (one compile): text cut at stops."""
    groups = collections.defaultdict(list)
    for i, request in enumerate(requests):
      groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
    out = [None] * len(requests)
    for members in groups.values():
      texts, steps = self._generate([requests[i].args for i in members])
      self._tally([requests[i] for i in members], steps)
      for i, text in zip(members, texts):
        out[i] = text
    return out

  def _generate(self, args: list[tuple[str, dict]]) -> tuple[list[str], list[tuple[int, int]]]:
    """(texts, (loop steps run, tokens) per request) of requests that share their generation settings."""
    kwargs = normalize_gen_kwargs(args[0][1], DEFAULT_GEN_TOKENS)
    stops = handle_stop_sequences(kwargs["until"], self.tok_decode([self.eot_token_id]))
    new_tokens = kwargs["max_gen_toks"]
    room = self.max_length - new_tokens
    if room < 1:
      raise HarnessError(f"max_gen_toks {new_tokens} leaves no room for a context in max_length "
                         f"{self.max_length}. Fix: raise max_length (model argument) or lower max_gen_toks")
    prompts = [self.tok_encode(context)[-room:] for context, _ in args]
    sampling = Sampling(float(kwargs.get("temperature", 0.0)) if kwargs["do_sample"] else 0.0,
                        int(kwargs.get("top_k", 0)), float(kwargs.get("top_p", 1.0)))
    opts = generator.Options(max_new_tokens=new_tokens, loop_steps=self.depth.loop_steps,
                             exit_threshold=self.depth.exit_threshold, kv_cache=self.kv_cache,
                             sampling=sampling, seed=int(kwargs.get("seed", 0)), eos_ids=self.model.eos_ids,
                             batch_size=self.scorer.batch_rows)
    with jax.set_mesh(self.model.mesh):
      module = self.model.replicated()
      results = generator.generate_ids(module, prompts, opts, self.max_length, decode.weights_of(module))
    return ([postprocess_generated_text(self.tok_decode(r.generated_ids), stops, None) for r in results],
            [(sum(r.exit_steps), len(r.exit_steps)) for r in results])


@register_model("loopjax")
class LoopjaxLM(DepthLM):
  """`--model loopjax`: the model arguments of the module docstring, at one depth (one T, or q at T)."""

  def __init__(self, checkpoint: str = "", hf: str = "", step: int | None = None, tokenizer: str = "",
               loop_steps: int = 0, exit_threshold: float | None = None, max_length: int = 0,
               add_bos_token: bool = True, kv_cache: str = "full", batch_size: int | str = DEFAULT_BATCH_ROWS,
               max_batch_size: int | None = None, device: str | None = None):
    """lm-eval passes batch_size, max_batch_size and device to every backend: batch_size is the rows per
    forward ("auto": the default), and the other two do not apply (JAX places the work)."""
    del max_batch_size, device
    if kv_cache not in inputs.STRATEGIES:
      raise HarnessError(f"kv_cache={kv_cache}: unknown KV cache strategy. Fix: use one of "
                         f"{', '.join(inputs.STRATEGIES)}")
    model = model_lib.from_source(model_lib.load_source(checkpoint=str(checkpoint), hf=str(hf), step=step,
                                                        tokenizer=str(tokenizer)), int(max_length))
    depth = check(Depth(int(loop_steps) or model.model_cfg.loop_steps, exit_threshold), "model_args")
    rows = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH_ROWS
    scorer = Scorer(model.model_cfg, model.mesh, [depth], batch_rows=rows, max_len=model.max_len)
    super().__init__(model, depth, scorer, add_bos_token=bool(add_bos_token), kv_cache=kv_cache)
