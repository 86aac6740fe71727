"""The peer figure on this machine: a plain PyTorch eager training step of the same looped model.

    python bench/bench_torch_peer.py [--loop-steps 4 --rounds 5 --threads 2]

Needs torch (not a loopjax dependency; e.g. a separate venv with `pip install torch`). Issue #11 compared
loopjax with the released Ouro PyTorch code on another day's machine; these VMs' speed moves 1.5x
between days, so a tokens/s ratio is only worth something when both sides run on the same machine in
the same hour. This is written from SPEC section 1-2, not copied: the Ouro sandwich layer (four
RMSNorms), rotate-half RoPE, causal attention through `scaled_dot_product_attention` (PyTorch's fastest
CPU path, a stronger baseline than the released code's eager matmul + softmax), SwiGLU, the final norm
and an untied head after every loop step, a linear exit gate, and the Stage I loss
sum_t p(t) CE_t - beta H(p) with p from the gate's survival products. AdamW, float32, the peer shape of
`bench/common.py` (D 256, 8 heads of 32, MLP 688, vocab 4096, L 4, batch 8 x seq 256).

It prints a line per round and the median; compare with `bench/bench_train.py --tables peer` run right
before or after it.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

D, HEADS, HEAD_DIM, MLP, VOCAB, LAYERS, BATCH, SEQ = 256, 8, 32, 688, 4096, 4, 8, 256


def rms_norm(x, weight, eps=1e-6):
  return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope(x_BNSH, cos_SH, sin_SH):
  x1, x2 = x_BNSH.chunk(2, dim=-1)
  return x_BNSH * cos_SH + torch.cat([-x2, x1], dim=-1) * sin_SH


class Layer(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.qkv = torch.nn.Linear(D, 3 * HEADS * HEAD_DIM, bias=False)
    self.o = torch.nn.Linear(HEADS * HEAD_DIM, D, bias=False)
    self.gate_up = torch.nn.Linear(D, 2 * MLP, bias=False)
    self.down = torch.nn.Linear(MLP, D, bias=False)
    self.norms = torch.nn.Parameter(torch.ones(4, D))

  def forward(self, x_BSD, cos_SH, sin_SH):
    B, S, _ = x_BSD.shape
    q, k, v = self.qkv(rms_norm(x_BSD, self.norms[0])).view(B, S, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(rope(q, cos_SH, sin_SH), rope(k, cos_SH, sin_SH), v, is_causal=True)
    h_BSD = x_BSD + rms_norm(self.o(out.transpose(1, 2).reshape(B, S, D)), self.norms[1])
    gate, up = self.gate_up(rms_norm(h_BSD, self.norms[2])).chunk(2, dim=-1)
    return h_BSD + rms_norm(self.down(F.silu(gate) * up), self.norms[3])


class LoopedLM(torch.nn.Module):
  def __init__(self, loop_steps: int):
    super().__init__()
    self.loop_steps = loop_steps
    self.embed = torch.nn.Embedding(VOCAB, D)
    self.layers = torch.nn.ModuleList(Layer() for _ in range(LAYERS))
    self.final_norm = torch.nn.Parameter(torch.ones(D))
    self.head = torch.nn.Linear(D, VOCAB, bias=False)
    self.exit_gate = torch.nn.Linear(D, 1)
    inv_freq = 1.0 / (10_000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    angles = torch.arange(SEQ).float()[:, None] * inv_freq
    self.register_buffer("cos", torch.cat([angles, angles], -1).cos())
    self.register_buffer("sin", torch.cat([angles, angles], -1).sin())

  def loss(self, inputs_BS, targets_BS, beta: float = 0.1):
    x_BSD = self.embed(inputs_BS)
    ces, gates = [], []
    for _ in range(self.loop_steps):
      for layer in self.layers:
        x_BSD = layer(x_BSD, self.cos, self.sin)
      h_BSD = rms_norm(x_BSD, self.final_norm)
      ces.append(F.cross_entropy(self.head(h_BSD).flatten(0, 1), targets_BS.flatten(), reduction="none"))
      gates.append(self.exit_gate(h_BSD).flatten())
    ce_TN, gate_TN = torch.stack(ces), torch.stack(gates)
    log_stay_TN = F.logsigmoid(-gate_TN)
    log_survival_TN = torch.cat([torch.zeros_like(log_stay_TN[:1]), log_stay_TN[:-1].cumsum(0)])
    log_p_TN = torch.cat([F.logsigmoid(gate_TN[:-1]) + log_survival_TN[:-1], log_survival_TN[-1:]])
    p_TN = log_p_TN.exp()
    return ((p_TN * ce_TN).sum(0) + beta * (p_TN * log_p_TN).sum(0)).mean()


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--loop-steps", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps-per-round", type=int, default=2)
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = LoopedLM(args.loop_steps)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
  tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = model.loss(inputs, targets)
    loss.backward()
    optimizer.step()
    return float(loss)

  step()  # warm-up
  walls, cpus = [], []
  for r in range(args.rounds):
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps_per_round):
      loss = step()
    walls.append((time.perf_counter() - wall) / args.steps_per_round)
    cpus.append((time.process_time() - cpu) / args.steps_per_round)
    print(f"round {r}: {1e3 * walls[-1]:,.0f} ms/step wall, {1e3 * cpus[-1]:,.0f} CPU ms, loss {loss:.3f}",
          flush=True)
  wall, cpu = statistics.median(walls), statistics.median(cpus)
  print(f"torch {torch.__version__}, {args.threads} threads, T={args.loop_steps}: {1e3 * wall:,.0f} ms/step wall, "
        f"{1e3 * cpu:,.0f} CPU ms, {BATCH * SEQ / wall:,.0f} tokens/s (medians of {args.rounds} rounds)")


if __name__ == "__main__":
  main()
