"""A train step's FLOPs per chip, the dense matmuls and the attention core apart (the pre-flight's count).

Why: the ideal step time divides a chip's FLOPs by its peak, and a chip's share of the attention is not
simply 1/chips. Attention grows with the sequence (at the Ouro recipe's 64K stage it is most of the
step), and a kernel that runs whole sequences on every device of a context group does c times its share
(issue 30). So the pre-flight counts it from what each chip's kernel runs on: the query rows it takes
(read from the compiled program where the kernel is a Pallas call, `splash_query_rows`; XLA's cost
analysis does not see inside those calls, and counts each scan body once).

Counts follow `loopjax.model.flops_per_token` (training: forward + backward = 3 forwards; causal
attention as S / 2 keys per query). Its attention part is the part that grows with the sequence:
flops(S) - flops(0). Dense work splits evenly over the chips (rows over data x fsdp, positions over
context, heads and MLP over tensor); attention splits over rows and heads, and over the context group
by the query rows each chip's kernel takes: in the load-balanced order (`model.token_order`) S / c
rows are exactly 1/c of the causal work, while S rows (every chip the whole sequence) are all of it.
"""

import dataclasses
import re

from loopjax.model import flops_per_token


@dataclasses.dataclass(frozen=True)
class StepFlops:
  dense_step: float  # all chips together
  attention_step: float
  dense_chip: float  # one chip's share
  attention_chip: float
  query_rows: int  # query positions one chip's attention runs on (of seq_len)


def step_flops(model_cfg, seq_len: int, tokens_step: int, mesh: dict, query_rows: int,
               training: bool = True) -> StepFlops:
  """The step's FLOPs on a `mesh` (axis name -> size) whose chips each run attention on `query_rows`."""
  dense = flops_per_token(model_cfg, 0, training=training) * tokens_step
  attention = flops_per_token(model_cfg, seq_len, training=training) * tokens_step - dense
  chips = mesh["data"] * mesh["fsdp"] * mesh["context"] * mesh["tensor"]
  return StepFlops(dense, attention, dense / chips,
                   attention / (chips // mesh["context"]) * query_rows / seq_len, query_rows)


_DEFINITION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) ", re.MULTILINE)
_SPLASH_FORWARD = re.compile(r"^\s*(?:ROOT )?%(splash_\w+_fwd\S*) = .*? custom-call\(([^)]*)\)", re.MULTILINE)
_FLOAT_SHAPE = re.compile(r"^(?:f32|bf16|f16)\[([\d,]+)\]")


def splash_query_rows(hlo_text: str) -> int | None:
  """The query rows of the splash forward calls in a compiled program (None without one): the first
  floating-point operand of each call is q, [heads, Q, H] or [kv heads, G, Q, H]."""
  shapes = dict(_DEFINITION.findall(hlo_text))
  rows = set()
  for _, operands in _SPLASH_FORWARD.findall(hlo_text):
    for name in re.findall(r"%([\w.\-]+)", operands):
      if match := _FLOAT_SHAPE.match(shapes.get(name, "")):
        rows.add(int(match.group(1).split(",")[-2]))
        break
  return max(rows) if rows else None
