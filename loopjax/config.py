"""Every config key with its default, and the start-up checks that name the field and the fix.

A run's config is `default_config()` with a file in `configs/` applied on top and `--config.a.b=v`
overrides after that. The dict is locked, so an unknown key is an error at parse time. `validate`
runs before any array is allocated or anything compiles: a config that cannot work fails with one
`ConfigError` naming the field and what to change.

Stable keys other code and scripts rely on: train.steps, train.seed, train.log_every,
model.loop_steps, model.num_layers, mesh.data, mesh.fsdp, mesh.context, mesh.tensor.
"""

import importlib.util
import inspect
import math
import os

import ml_collections

from loopjax import config_checkpoint, config_longrun
from loopjax.model import MODEL_KINDS, model_kind
from loopjax.model.attention import CUDNN_DTYPES, IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from loopjax.model.stack import REMAT_POLICIES as STACK_REMAT_POLICIES

REMAT_POLICIES = ("none", *STACK_REMAT_POLICIES)
LOSS_REMAT = ("auto", "save", "recompute")
SCHEDULES = ("constant", "warmup_constant", "cosine", "wsd")
SCHEDULE_CHANGES = ("refuse", "continue", "reschedule")  # optim.on_schedule_change
PRIORS = ("uniform", "geometric")
LM_WEIGHTS = ("exit", "uniform")  # objective.lm_weights (exits.stage1_loss)
NAN_POLICIES = ("skip", "stop")
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64 for numerical checks


_CHOICES = {"model.kind": MODEL_KINDS, "model.remat": REMAT_POLICIES, "model.loss_remat": LOSS_REMAT,
            "model.attention": ATTENTION_IMPLEMENTATIONS, "model.param_dtype": DTYPES, "model.compute_dtype": DTYPES,
            "optim.schedule": SCHEDULES, "optim.on_schedule_change": SCHEDULE_CHANGES, "objective.prior": PRIORS,
            "objective.lm_weights": LM_WEIGHTS, "train.nan_policy": NAN_POLICIES}


class ConfigError(ValueError):
  """A config that cannot work; the message names the field and the fix."""


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.kind = "ouro"  # "ouro" (LoopLM, sandwich norms, exit gate) or "loop_residual" (GPT-2 style)
  m.vocab_size = 512
  m.hidden_size = 128
  m.num_layers = 2  # L: layers in the shared (looped) stack
  m.num_heads = 4
  m.num_kv_heads = 4  # < num_heads gives GQA
  m.head_dim = 32
  m.mlp_dim = 352
  m.loop_steps = 4  # T: how often the shared stack runs per token
  m.rope_base = 10_000.0
  m.norm_eps = 1e-6
  m.tie_embeddings = False
  m.param_dtype = "float32"
  m.compute_dtype = "float32"
  m.remat = "full"  # one of REMAT_POLICIES (model/stack.py says what each keeps), applied to each layer
  # lax.scan unroll factors of the layer scan and the loop-step scan: 1 keeps compile time flat in L and T;
  # unrolling (e.g. both = L, T with remat none) makes small models faster on CPU (BENCHMARKS.md, issue 11).
  m.layer_unroll = 1
  m.loop_unroll = 1
  m.loss_chunk = 0  # >0: compute the LM head + CE in sequence chunks of this many tokens (when recomputed)
  # The LM head's backward: "save" keeps d CE / d logits ([T, B, S, V] in compute dtype) and skips the
  # recomputation; "recompute" rebuilds the logits (memory [B, S, D] per step); "auto" saves when it fits.
  m.loss_remat = "auto"
  m.init_std = 0.02
  m.gate_bias_init = 0.0  # Ouro: the exit gate's initial bias (0 starts at p = 1/2, 1/4, ...; < 0 tilts it to step T)
  # Loop-Residual: the residual branches' output projections start at init_std / sqrt(2 x layer applications),
  # GPT-2's depth scaling counted over the unrolled depth (prelude + layers x loop_steps + coda).
  m.depth_scaled_init = False
  # The attention core (loopjax/model/attention.py): "xla" (dense [S, S] scores), "blocked" (pure-JAX
  # flash-style, O(S) memory), "native" (a C++ XLA:CPU kernel, built on first use), "splash" (Pallas TPU
  # kernel), "pallas_gpu" (Pallas GPU flash kernel with documents), "cudnn" (GPU, rows without documents), or
  # "auto": splash on TPU, pallas_gpu on GPU (blocked with mesh.context > 1), native on CPU (attention.py).
  m.attention = "auto"
  # blocked/splash block sizes, capped at the sequence; a set size must tile train.seq_len. 0 = the
  # implementation's default (blocked 64, splash 512; the whole sequence where that does not tile it).
  m.attention_block_q = 0
  m.attention_block_kv = 0
  # Loop-Residual only: layers before and after the looped block, and the learned position table.
  m.prelude_layers = 0
  m.coda_layers = 0
  m.max_positions = 1024

  c.objective = o = ml_collections.ConfigDict()
  o.beta = 0.1  # entropy weight in the Stage I loss
  o.prior = "uniform"  # "uniform" (Ouro) or "geometric" (PonderNet KL)
  o.geometric_lambda = 0.5  # prior's per-step exit probability when prior == "geometric"
  # What weights step t's CE in the LM's gradient: "exit" p(t) (Ouro), or "uniform" 1/T (the gate still
  # learns from sum_t p(t) CE_t; the loss value is the same). exits.stage1_loss says why one might.
  o.lm_weights = "exit"
  # Stage II (a phase with objective "gate"): continuation target sigmoid(k (I_t - gamma)), SPEC section 2.
  o.gate_k = 50.0
  o.gate_gamma = 0.005

  c.optim = p = ml_collections.ConfigDict()
  p.lr = 3e-4
  p.schedule = "wsd"  # one of SCHEDULES
  p.warmup_steps = 10
  p.decay_steps = 0  # wsd: length of the final decay; cosine: 0 means all steps after warmup
  p.end_lr = 3e-5
  p.b1 = 0.9
  p.b2 = 0.95
  p.eps = 1e-8
  p.weight_decay = 0.1
  p.clip_norm = 1.0
  # Resuming with a changed LR schedule (train.steps, optim.*, phases give another LR at the checkpoint's
  # step; loopjax/train/resume_schedule.py): "refuse" (an error at start-up), "continue" (the LR goes on
  # from the checkpoint's last LR and never rises above it: min(new schedule, that LR)), or "reschedule"
  # (the new schedule as it is; the LR may jump).
  p.on_schedule_change = "refuse"

  c.train = t = ml_collections.ConfigDict()
  t.steps = 100  # optimizer steps; with `phases`: 0 = the recipe's own length, N = the recipe scaled to N
  t.seed = 0
  t.log_every = 10
  t.batch_size = 8  # global batch, in sequences
  # Gradient accumulation: rows each data-parallel shard (mesh.data x mesh.fsdp index) runs at once; a step
  # takes batch_size / (per_device_batch * data * fsdp) microbatches (loopjax/train/microbatch.py). 0 = all rows.
  t.per_device_batch = 0
  t.seq_len = 128
  t.progress = True  # tqdm progress bar on process 0
  # A step whose loss or grad norm is NaN/Inf never updates the weights (the step's NaN guard);
  # "skip" counts it (metrics: nonfinite_steps) and goes on, "stop" ends the run with the step number.
  t.nan_policy = "skip"
  t.peak_flops = 0.0  # MFU denominator, FLOP/s of all devices; 0 = env LOOPJAX_PEAK_FLOPS, the chip table, or a probe
  config_longrun.add_defaults(t)  # trackers, step watchdog, spike skipping, profiles (config_longrun.py)

  c.checkpoint = ml_collections.ConfigDict()
  config_checkpoint.add_defaults(c.checkpoint)  # saving, keeping, resuming, the lease (config_checkpoint.py)

  c.data = d = ml_collections.ConfigDict()
  # One source or a comma-separated mixture: built-in tasks "mano", "multihop", "capo" (no files
  # needed) and/or directories written by `loopjax prepare`.
  d.source = "mano"
  d.weights = ""  # comma-separated mixture weights, one per source; "" = equal
  d.packing = "document"  # "document" (first-fit, whole documents + padding) or "concat" (concat-and-split)
  d.num_shards = 0  # logical data shards (fixed stream for any process count dividing it); 0 = gcd(batch, 64)
  d.packing_bins = 0  # first-fit bins per packing round; 0 = the per-process batch size
  d.shuffle = True  # shuffle corpus documents (a new permutation each epoch)
  d.loss_on = "answer"  # synthetic tasks: train on "answer" tokens only, or on "all" targets
  d.num_workers = 0  # >0: one pool of grain worker processes per process (needs absl flags parsed, a __main__ guard)
  d.read_threads = 0  # grain reader threads per process (0 = in the main thread; threads contend for the GIL)
  d.task_seed = 0  # synthetic tasks: seed of the fixed world (people, relations, biographies)
  d.mano_max_ops = 6  # Mano: expressions with 1..mano_max_ops operations (eval at mano_max_ops)
  d.multihop_people = 64  # multi-hop QA: people in the world
  d.multihop_relations = 4  # multi-hop QA: relations, each a random function person -> person
  d.multihop_max_hops = 3  # multi-hop QA: questions with 1..max_hops hops (eval at max_hops)
  d.multihop_train_questions = 0  # >0: only this many distinct multi-hop training questions
  d.capo_people = 256  # Capo: biographies
  d.capo_attributes = 4  # Capo: attributes per biography
  d.capo_values = 16  # Capo: possible values per attribute

  c.eval = e = ml_collections.ConfigDict()
  e.every_steps = 0  # >0: evaluate during training every this many steps (and at the end)
  e.num_batches = 4  # held-out batches per evaluation
  e.batch_size = 0  # sequences per eval batch; 0 = train.batch_size
  e.loop_steps = ""  # comma-separated loop counts to evaluate at, e.g. "1,2,4,8"; "" = model.loop_steps
  e.source = ""  # held-out data (a task or corpus dirs); "" = the corpora's validation splits, else data.source
  e.seed = 1  # which held-out batches
  e.q_exit = 0.5  # Q-exit threshold for the exit-selected exact-match accuracy (and the harness's q<q>)
  # lm-evaluation-harness during training (the `harness` extra; loopjax/evaluation/harness): these tasks
  # (comma-separated, e.g. "multihop_mc,hellaswag") every harness_every_steps steps and at the end, at every
  # eval.loop_steps T and at Q-exit eval.q_exit, on harness_limit documents per task (0 = all).
  e.harness_tasks = ""
  e.harness_every_steps = 0
  e.harness_limit = 0

  # Staged recipe: a tuple of `loopjax.phases.phase(...)` run in order by one `loopjax train` (see
  # configs/ouro_recipe.py). Empty: one phase, the config as it is.
  c.phases = ()

  c.init = i = ml_collections.ConfigDict()
  # Where a run without a checkpoint yet takes its parameters from (its optimizer state starts fresh);
  # both empty = a fresh initialisation. Ignored once the run has a checkpoint.
  i.from_hf = ""  # an HF Ouro directory (config.json + safetensors); model must match its config.json
  i.from_checkpoint = ""  # "DIR[:STEP]": another run's params (e.g. upscaled), onto this run's mesh and dtypes

  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1  # -1 takes whatever devices the other axes leave
  ms.fsdp = 1
  ms.context = 1  # context parallelism: splits activations along the sequence (within one process)
  ms.tensor = 1

  c.lock()
  return c


def load_config_file(path: str, relative_to: str | None = None) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, or `get_config(ARG)` for "file.py:ARG" (like ml_collections' flags).

  A relative `path` resolves against the file `relative_to` (configs that build on other configs).
  """
  path, _, arg = path.partition(":") if not os.path.exists(path) else (path, "", "")
  if relative_to is not None and not os.path.isabs(path):
    path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
  if not os.path.isfile(path):
    raise ConfigError(f"--config: no config file {path!r}. Fix: give a path such as configs/smoke.py")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  takes_arg = bool(inspect.signature(module.get_config).parameters)
  if arg and not takes_arg:
    raise ConfigError(f"--config: {path}:{arg}: this file's get_config() takes no argument. Fix: drop ':{arg}'")
  return module.get_config(arg) if arg else module.get_config()


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
  """The defaults updated with a nested dict (e.g. the resolved config saved in a checkpoint)."""
  cfg = default_config()

  def update(section, updates, prefix):
    for key, value in updates.items():
      if key not in section:
        raise ConfigError(f"config.{prefix}{key}: unknown key in the saved config. Fix: use a loopjax version "
                          "that knows it, or pass --config explicitly")
      if isinstance(value, dict):
        update(section[key], value, f"{prefix}{key}.")
      else:
        section[key] = value

  update(cfg, config_longrun.upgrade(values), "")
  return cfg


def _fail(field: str, problem: str, fix: str):
  raise ConfigError(f"config.{field}: {problem}. Fix: {fix}.")


def _check_choice(cfg, field: str, choices):
  value = cfg
  for part in field.split("."):
    value = value[part]
  if value not in choices:
    _fail(field, f"{value!r} is not one of {choices}", f"set --config.{field} to one of {choices}")


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int, int]:
  """(data, fsdp, context, tensor) with a single -1 filled so the product equals num_devices."""
  names = ("data", "fsdp", "context", "tensor")
  sizes = [int(mesh_cfg[n]) for n in names]
  if sum(s == -1 for s in sizes) > 1:
    _fail("mesh", f"more than one axis is -1 ({dict(zip(names, sizes))})",
          "leave at most one of mesh.data/fsdp/context/tensor at -1")
  for n, s in zip(names, sizes):
    if s == 0 or s < -1:
      _fail(f"mesh.{n}", f"size {s} is invalid", "use a positive size or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      _fail("mesh", f"the fixed axes ({known} devices) do not divide the {num_devices} devices",
            f"choose mesh sizes whose product divides {num_devices}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    _fail("mesh", f"data*fsdp*context*tensor = {math.prod(sizes)} but there are {num_devices} devices",
          f"make the product {num_devices}, or set one axis to -1")
  return tuple(sizes)


def _check_attention_blocks(m, seq_len: int):
  """Blocked and splash attention tile the sequence (blocks larger than it shrink to it; 0 = default)."""
  for field in ("attention_block_q", "attention_block_kv"):
    block = min(m[field], seq_len)
    if m[field] < 0 or (block and seq_len % block):
      _fail(f"model.{field}", f"{m[field]} does not tile train.seq_len={seq_len}",
            f"use a divisor of {seq_len} (e.g. {math.gcd(seq_len, 512)}), a size >= the sequence, or 0 (default)")


def validate(cfg, num_devices: int) -> tuple[int, int, int]:
  """Checks the config alone (no files, no devices but their count); returns the resolved mesh shape.

  What needs more than the config is checked where the run is set up: data sources and their
  vocabulary (`loopjax.data.validate`, reads corpus manifests) and a staged recipe's phases
  (`loopjax.phases.plan`, which puts every phase's derived config through this function).
  """
  m, t = cfg.model, cfg.train
  for field, choices in _CHOICES.items():
    _check_choice(cfg, field, choices)
  for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "mlp_dim", "loop_steps", "layer_unroll", "loop_unroll"):
    if m[field] < 1:
      _fail(f"model.{field}", f"must be >= 1, got {m[field]}", f"set --config.model.{field} to a positive integer")
  if m.num_heads % m.num_kv_heads:
    _fail("model.num_kv_heads", f"{m.num_kv_heads} does not divide num_heads={m.num_heads}",
          "pick num_kv_heads that divides num_heads (GQA groups must be whole)")
  if m.kind == "loop_residual" and m.hidden_size % m.num_heads:
    _fail("model.num_heads", f"{m.num_heads} heads do not divide hidden_size={m.hidden_size}",
          "choose num_heads dividing hidden_size (GPT-2 uses head_dim = hidden_size / num_heads)")
  if m.kind == "loop_residual" and m.num_heads * m.head_dim != m.hidden_size:
    _fail("model.head_dim", f"num_heads*head_dim = {m.num_heads * m.head_dim} != hidden_size={m.hidden_size}",
          f"set --config.model.head_dim={m.hidden_size // m.num_heads}")
  if m.depth_scaled_init and m.kind != "loop_residual":
    _fail("model.depth_scaled_init", f"is for model.kind='loop_residual', not {m.kind!r}", "set it to False")
  if m.head_dim % 2 and m.kind == "ouro":
    _fail("model.head_dim", f"RoPE needs an even head_dim, got {m.head_dim}", "use an even head_dim")
  if m.kind == "loop_residual" and t.seq_len > m.max_positions:
    _fail("train.seq_len", f"{t.seq_len} exceeds model.max_positions={m.max_positions}",
          "raise model.max_positions or shorten train.seq_len")
  if m.loss_chunk < 0 or (m.loss_chunk and t.seq_len % (m.loss_chunk * max(cfg.mesh.context, 1))):
    _fail("model.loss_chunk", f"{m.loss_chunk} does not divide train.seq_len={t.seq_len} / mesh.context (each "
          "device's positions)", "use 0 (no chunking) or a divisor of train.seq_len / mesh.context")
  _check_attention_blocks(m, t.seq_len)
  if m.attention == "cudnn" and m.compute_dtype not in CUDNN_DTYPES:
    _fail("model.attention", f"cudnn runs in {CUDNN_DTYPES}, not compute_dtype={m.compute_dtype}",
          "set model.compute_dtype=bfloat16, or model.attention to auto, blocked or xla")
  if cfg.objective.beta < 0:
    _fail("objective.beta", f"must be >= 0, got {cfg.objective.beta}", "use a non-negative entropy weight")
  if cfg.objective.gate_k <= 0 or cfg.objective.gate_gamma < 0:
    _fail("objective.gate_k", f"gate_k={cfg.objective.gate_k} must be > 0 and gate_gamma="
          f"{cfg.objective.gate_gamma} >= 0", "use the paper's k=50, gamma=0.005 or other positive values")
  if not 0 < cfg.objective.geometric_lambda < 1:
    _fail("objective.geometric_lambda", f"must be in (0, 1), got {cfg.objective.geometric_lambda}",
          "choose a per-step exit probability strictly between 0 and 1")
  for field in ("steps", "batch_size", "seq_len", "log_every"):
    if t[field] < 1 and not (field == "steps" and cfg.phases):
      _fail(f"train.{field}", f"must be >= 1, got {t[field]}", f"set --config.train.{field} to a positive integer")
  if t.peak_flops < 0:
    _fail("train.peak_flops", f"must be >= 0, got {t.peak_flops}", "give the devices' total FLOP/s, or 0 to measure")
  config_longrun.check(t, _fail)
  config_checkpoint.check(cfg.checkpoint, _fail)
  o = cfg.optim
  if o.warmup_steps < 0 or o.decay_steps < 0:
    _fail("optim.warmup_steps", "warmup_steps and decay_steps must be >= 0", "use non-negative step counts")
  data, fsdp, context, tensor = resolve_mesh_shape(cfg.mesh, num_devices)
  if context > 1 and t.seq_len % (2 * context):  # the load-balanced order cuts it into 2 x context chunks
    _fail("mesh.context", f"2 x {context} does not divide train.seq_len={t.seq_len}", "choose mesh.context with "
          f"train.seq_len a multiple of 2 x mesh.context (each device holds two chunks of seq_len / (2 x context))")
  if t.batch_size % (data * fsdp):
    _fail("train.batch_size", f"{t.batch_size} is not divisible by the data-parallel size "
          f"mesh.data*mesh.fsdp = {data * fsdp}", f"use a multiple of {data * fsdp}")
  if t.per_device_batch < 0 or (t.per_device_batch and t.batch_size % (t.per_device_batch * data * fsdp)):
    _fail("train.per_device_batch", f"{t.per_device_batch} rows per data-parallel shard x {data * fsdp} shards "
          f"(mesh.data*mesh.fsdp) do not divide train.batch_size={t.batch_size}",
          f"use a divisor of {t.batch_size // (data * fsdp)} (rows per shard), or 0 for the whole batch at once")
  if m.hidden_size % fsdp:
    _fail("model.hidden_size", f"{m.hidden_size} is not divisible by mesh.fsdp={fsdp}",
          f"choose mesh.fsdp dividing {m.hidden_size}")
  for field in ("num_heads", "num_kv_heads", "mlp_dim", "vocab_size"):
    if m[field] % tensor:
      _fail(f"model.{field}", f"{m[field]} is not divisible by mesh.tensor={tensor}",
            f"choose mesh.tensor dividing model.{field}, or pad model.{field} to a multiple of {tensor}")
  e = cfg.eval
  if e.every_steps < 0 or e.num_batches < 1 or e.batch_size < 0:
    _fail("eval", f"every_steps={e.every_steps}, num_batches={e.num_batches}, batch_size={e.batch_size}",
          "use every_steps >= 0, num_batches >= 1, batch_size >= 0")
  try:
    eval_steps = [int(x) for x in str(e.loop_steps).split(",")] if str(e.loop_steps).strip() else []
  except ValueError:
    eval_steps = [0]
  if any(x < 1 for x in eval_steps):
    _fail("eval.loop_steps", f"{e.loop_steps!r} is not a comma-separated list of positive integers", "e.g. 1,2,4,8")
  if (e.batch_size or t.batch_size) % (data * fsdp):
    _fail("eval.batch_size", f"{e.batch_size} is not divisible by mesh.data*mesh.fsdp = {data * fsdp}",
          f"use a multiple of {data * fsdp} (or 0 for train.batch_size)")
  if not 0 <= e.q_exit <= 1:
    _fail("eval.q_exit", f"{e.q_exit} is outside [0, 1]", "use a threshold between 0 and 1")
  if e.harness_every_steps < 0 or e.harness_limit < 0:
    _fail("eval.harness_every_steps", f"harness_every_steps={e.harness_every_steps} and harness_limit="
          f"{e.harness_limit} must be >= 0", "use 0 (off / all documents) or a positive number")
  if bool(str(e.harness_tasks).strip()) != bool(e.harness_every_steps):
    _fail("eval.harness_tasks", f"harness_tasks={e.harness_tasks!r} with harness_every_steps={e.harness_every_steps}",
          "set both (tasks, and how often to run them) or neither")
  if cfg.init.from_hf and cfg.init.from_checkpoint:
    _fail("init", "from_hf and from_checkpoint are both set", "set one of them (or neither, for a fresh init)")
  if cfg.init.from_hf and model_kind(m.kind).hf is None:
    _fail("init.from_hf", f"model kind {m.kind!r} has no Hugging Face format",
          "set model.kind='ouro' or drop init.from_hf")
  return data, fsdp, context, tensor
