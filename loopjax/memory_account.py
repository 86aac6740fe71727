"""Where a chip's memory goes: the compiled step's buffers, grouped by what they hold (`loopjax compile --explain`).

`memory_analysis()` gives four totals. To say *why* a step needs its temporaries, this module has XLA
dump the buffer assignment of the same compile (`xla_dump_to`, a compiler option, so no environment
variable and no second backend) and reads its memory-usage report: the temporary buffer split into
disjoint regions, each listing the values XLA placed there over the program's life. A region is named
after its largest value, whose shape is matched against the model's dimensions:

  saved layer inputs     [T, L, b, S, D]: the residual stream entering each layer at each loop step, the
                         only activation full remat keeps for the backward pass
  one step's layers      [L, b, S, D]: a loop step's layer inputs, re-sliced in its backward pass
  per-step states        [T, ...S or chunk..., D]: final-norm outputs, gate and LM-head inputs per step
  LM head and CE         any dim = V: the gathered head kernel, its gradient, a chunk's logits
  layer weights          one layer's gathered weights and their unsharded gradients (no S dim)
  layer activations      one layer's working set: attention q/k/v and outputs, MLP hidden states
  sharded state          per-chip slices of parameters, gradients and Adam updates (an L dim, no S)

The report's default memory space holds the arguments (the state's shards) and the temporary buffer.
What it leaves unlisted (XLA shows regions down to the last 5% of the total) is "small buffers"; what
memory_analysis counts beyond the dumped allocations (XLA:TPU reserves some HBM of its own) is
reported as such, unattributed.
"""

import collections
import math
import os
import re
import tempfile

CATEGORIES = ("saved layer inputs", "one step's layers", "per-step states", "LM head and CE", "layer weights",
              "layer activations", "sharded state", "other")
_REGION = re.compile(r"^\s*[\d.]+\w+\(\s*\d+%\);\s*([\d.]+)(\w+);\s*(\d+);\s*\d+;\s*(.*)$")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")  # "bf16[4,24,1,4096,2048]" (a "5×" count before it is ignored)
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def dims_of(cfg) -> dict:
  m = cfg.model
  return {"T": m.loop_steps, "L": m.num_layers, "S": cfg.train.seq_len, "D": m.hidden_size, "V": m.vocab_size,
          "F": m.mlp_dim, "NH": m.num_heads * m.head_dim}


def classify(shape: tuple[int, ...], dims: dict) -> str:
  """The category of one buffer shape (see the module docstring)."""
  T, L, S, D, V, F = (dims[k] for k in ("T", "L", "S", "D", "V", "F"))
  has = lambda n: n in shape
  tokens = [d for d in shape if d >= 128 and S % d == 0]  # the sequence, or a chunk / context shard of it
  if has(V):
    return "LM head and CE"
  if shape and shape[-1] == D and tokens and len(shape) >= 3:
    if shape[0] == T and len(shape) >= 4 and shape[1] == L:
      return "saved layer inputs"
    if shape[0] == L:
      return "one step's layers"
    if shape[0] == T:
      return "per-step states"
  if tokens and any(d in (D, F, dims["NH"]) or d in (16, 32, 64, 128, 256) for d in shape):
    return "layer activations"
  if has(L) and not tokens:
    return "sharded state"
  if (has(D) or has(F)) and not tokens:
    return "layer weights"
  return "other"


def parse_report(text: str) -> list[tuple[int, int, tuple[int, ...]]]:
  """(offset, bytes, shape of its largest value) of each region of the temporary buffer: the first table of
  the default memory space (the tables after it are the argument allocations, one each)."""
  regions, in_default, tables = [], False, 0
  for line in text.splitlines():
    if line.startswith("Memory Space:"):
      in_default, tables = "default" in line, 0
    elif in_default and line.strip().startswith("cumulative_size"):
      tables += 1
    elif in_default and tables == 1 and (match := _REGION.match(line)):
      size = int(float(match.group(1)) * _UNITS[match.group(2)])
      shapes = []
      for dtype, dims in _SHAPE.findall(match.group(4)):
        shape = tuple(int(d) for d in dims.split(",") if d)
        shapes.append((int(re.sub(r"\D", "", dtype) or 8) // 8 * math.prod(shape), shape))
      regions.append((int(match.group(3)), size, max(shapes)[1] if shapes else ()))
  return regions


def partition(regions) -> dict[str, int]:
  """Bytes of the temporary buffer per category. Regions overlap in the address space (XLA reuses bytes
  whose values are dead); each byte goes to the largest region that covers it."""
  edges = sorted({x for offset, size, _ in regions for x in (offset, offset + size)})
  by_size = sorted(regions, key=lambda r: -r[1])
  totals = collections.Counter()
  for lo, hi in zip(edges, edges[1:]):
    owner = next((r for r in by_size if r[0] <= lo and hi <= r[0] + r[1]), None)
    if owner is not None:
      totals[owner[2]] += hi - lo
  return totals


def compile_with_dump(lowered):
  """(compiled, memory-usage report text or "", bytes of the temporary allocation) of `lowered`, compiled
  with XLA's buffer assignment dumped to a temporary directory."""
  with tempfile.TemporaryDirectory(prefix="loopjax-xla-dump-") as dump:
    compiled = lowered.compile(compiler_options={"xla_dump_to": dump})
    reports = sorted(f for f in os.listdir(dump) if "train_step" in f and f.endswith("memory-usage-report.txt"))
    text = open(os.path.join(dump, reports[-1])).read() if reports else ""
    assignments = [f for f in os.listdir(dump) if "train_step" in f and f.endswith("buffer-assignment.txt")]
    temp = 0
    for name in assignments[-1:]:
      sizes = re.findall(r"^allocation \d+: size (\d+), preallocated-temp", open(os.path.join(dump, name)).read(),
                         re.MULTILINE)
      temp = sum(map(int, sizes))
  return compiled, text, temp


def account(report_text: str, temp_allocation: int, cfg, temp_bytes: int) -> list[tuple[str, int]]:
  """[(category, bytes)] of the temporaries, summing to memory_analysis' `temp_bytes`: the temporary
  buffer (`temp_allocation` bytes) by category, its bytes no listed region covers, then what
  memory_analysis counts beyond it."""
  dims, totals = dims_of(cfg), collections.Counter()
  for shape, size in partition(parse_report(report_text)).items():
    totals[classify(shape, dims)] += size
  rows = [(c, totals[c]) for c in CATEGORIES if totals[c]]
  rows.append(("small buffers (not listed by XLA)", max(temp_allocation - sum(totals.values()), 0)))
  rows.append(("outside the buffer assignment", temp_bytes - max(temp_allocation, sum(totals.values()))))
  return rows


def format_account(rows: list[tuple[str, int]]) -> str:
  total = max(sum(size for _, size in rows), 1)
  size = lambda n: f"{n / 2**30:8.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:8.2f} MiB"
  lines = ["temporaries by what they hold (XLA's buffer assignment)"]
  lines += [f"  {name:<36} {size(n)}  {100 * n / total:5.1f}%" for name, n in rows]
  return "\n".join(lines)
