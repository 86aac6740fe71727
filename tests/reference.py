"""Plain numpy float64 reference implementations, written independently of loopjax's scanned code.

Python loops over loop steps and layers, explicit per-pair RoPE, explicit masks and a softmax: slow,
obvious, and sharing no code with the model under test.
"""

import numpy as np


def rms(x, w, eps):
  return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def layernorm(x, scale, bias, eps):
  mu = x.mean(-1, keepdims=True)
  return scale * (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) + bias


def rope(x_BSNH, positions_BS, base):
  half = x_BSNH.shape[-1] // 2
  freq = base ** (-2.0 * np.arange(half) / x_BSNH.shape[-1])
  angle = positions_BS[:, :, None, None] * freq  # [B, S, 1, half]
  first, second = x_BSNH[..., :half], x_BSNH[..., half:]
  return np.concatenate([first * np.cos(angle) - second * np.sin(angle),
                         second * np.cos(angle) + first * np.sin(angle)], axis=-1)


def attend(q_BSNH, k_BSKH, v_BSKH, segment_ids_BS):
  B, S, N, H = q_BSNH.shape
  group = N // k_BSKH.shape[2]
  out = np.zeros_like(q_BSNH)
  for b in range(B):
    for n in range(N):
      kv = n // group  # query head n reads kv head n // group (repeat_interleave order)
      scores = q_BSNH[b, :, n] @ k_BSKH[b, :, kv].T / np.sqrt(H)
      allowed = np.tril(np.ones((S, S), bool)) & (segment_ids_BS[b][:, None] == segment_ids_BS[b][None, :])
      scores = np.where(allowed, scores, -np.inf)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      out[b, :, n] = (weights / weights.sum(-1, keepdims=True)) @ v_BSKH[b, :, kv]
  return out


def ouro_forward(params, tokens_BS, segment_ids_BS, positions_BS, *, loop_steps, eps, rope_base):
  """(step_logits [T,B,S,V], gate_logits [T,B,S]) with explicit loops over steps and layers."""
  p = {k: v for k, v in params.items()}
  stack = params["stack"]
  num_layers = stack["wq"].shape[0]
  head_DV = p["lm_head"] if "lm_head" in p else p["embed"].T
  h = p["embed"][tokens_BS]
  all_logits, all_gates = [], []
  for _ in range(loop_steps):
    for layer in range(num_layers):
      w = {k: v[layer] for k, v in stack.items()}
      x = rms(h, w["norm_attn_in"], eps)
      q = rope(np.einsum("bsd,dnh->bsnh", x, w["wq"]), positions_BS, rope_base)
      k = rope(np.einsum("bsd,dnh->bsnh", x, w["wk"]), positions_BS, rope_base)
      v = np.einsum("bsd,dnh->bsnh", x, w["wv"])
      attn = np.einsum("bsnh,nhd->bsd", attend(q, k, v, segment_ids_BS), w["wo"])
      h = h + rms(attn, w["norm_attn_out"], eps)
      x = rms(h, w["norm_mlp_in"], eps)
      gate = x @ w["w_gate"]
      mlp = (gate / (1 + np.exp(-gate)) * (x @ w["w_up"])) @ w["w_down"]
      h = h + rms(mlp, w["norm_mlp_out"], eps)
    h = rms(h, p["final_norm"], eps)
    all_logits.append(h @ head_DV)
    all_gates.append(h @ p["exit_gate"]["kernel"] + p["exit_gate"]["bias"])
  return np.stack(all_logits), np.stack(all_gates)


def gpt2_forward(params, tokens_BS, *, loop_steps, eps=1e-5):
  """Final logits [B,S,V] of the Loop-Residual GPT-2 (no prelude/coda, tied head)."""
  S = tokens_BS.shape[1]
  x = params["wte"][tokens_BS] + params["wpe"][np.arange(S)][None]
  block = params["block"]
  segment_ids = np.ones(tokens_BS.shape, np.int64)
  for _ in range(loop_steps):
    for layer in range(block["wq"].shape[0]):
      w = {k: v[layer] for k, v in block.items()}
      y = layernorm(x, w["ln1_scale"], w["ln1_bias"], eps)
      q, k, v = (np.einsum("bsd,dnh->bsnh", y, w[n]) + w["b" + n[1]] for n in ("wq", "wk", "wv"))
      x = x + np.einsum("bsnh,nhd->bsd", attend(q, k, v, segment_ids), w["wo"]) + w["bo"]
      y = layernorm(x, w["ln2_scale"], w["ln2_bias"], eps) @ w["w_fc"] + w["b_fc"]
      y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))
      x = x + y @ w["w_proj"] + w["b_proj"]
  return layernorm(x, params["ln_f_scale"], params["ln_f_bias"], eps) @ params["wte"].T
