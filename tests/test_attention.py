"""The attention implementations behind `model.attention`, against a float64 reference.

Tolerance: max abs error / max abs reference value <= 2e-5 for float32 inputs (forward and the
gradients of q, k, v), 1e-12 for blocked attention in float64. The case has documents, padding
(segment id 0), GQA (4 query heads on 2 kv heads) and blocks of different query and key sizes; the
Pallas kernels (splash for TPU, pallas_gpu for GPU) run in interpret mode. The native kernel is also
checked where its tiles do not fit (odd S and H), in bf16, against central finite differences of
itself, and with documents that recur after another one; xla, blocked and native with the tokens in
the load-balanced order of context parallelism (tests/test_context_parallel.py splits them over a mesh).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from loopjax.config import ConfigError, validate
from loopjax.model import attention, gpu_attention, native_attention, token_order
from loopjax.train.driver import train
from loopjax.train.trainer import resolve_attention

B, S, N, K, H = 2, 256, 4, 2, 32


def inputs(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in [(B, S, N, H), (B, S, K, H), (B, S, K, H)])
  segment_ids = np.ones((B, S), np.int32)
  segment_ids[0, 100:190], segment_ids[0, 190:] = 2, 0  # two documents, then padding
  segment_ids[1, 7:] = 2  # a document boundary inside the first block
  return q, k, v, jnp.asarray(segment_ids)


def reference(q, k, v, segment_ids):
  q, k, v = (x.astype(jnp.float64) for x in (q, k, v))
  return attention.float64_attention(q, k, v, attention.attention_mask(segment_ids))


def values_and_grads(fn, q, k, v):
  """fn's output and the gradients of a fixed projection of it, as float64 numpy."""
  weights_H = jnp.sin(jnp.arange(H, dtype=q.dtype))
  out, vjp = jax.vjp(fn, q, k, v)
  grads = vjp(jnp.broadcast_to(weights_H, out.shape).astype(out.dtype))
  return [np.asarray(x, np.float64) for x in (out, *grads)]


def assert_close(got, want, rtol):
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert np.abs(a - b).max() <= rtol * np.abs(b).max(), (name, np.abs(a - b).max() / np.abs(b).max())


with jax.enable_x64():
  q64, k64, v64, seg = inputs(jnp.float64)
  WANT = values_and_grads(lambda q, k, v: reference(q, k, v, seg), q64, k64, v64)

IMPLEMENTATIONS = {
    "xla": lambda q, k, v, seg: attention.xla(q, k, v, seg),
    "blocked-32x64": lambda q, k, v, seg: attention.core(q, k, v, attention.Mask(seg, "blocked", 32, 64), "float32"),
    "blocked-64x32": lambda q, k, v, seg: attention.core(q, k, v, attention.Mask(seg, "blocked", 64, 32), "float32"),
    "blocked-default": lambda q, k, v, seg: attention.core(q, k, v, attention.Mask(seg, "blocked"), "float32"),
    "splash-interpret": lambda q, k, v, seg: attention.splash(q, k, v, seg, 128, 128, interpret=True),
    "pallas_gpu-interpret": lambda q, k, v, seg: gpu_attention.pallas_gpu(q, k, v, seg, interpret=True),
    "native": lambda q, k, v, seg: attention.core(q, k, v, attention.Mask(seg, "native"), "float32"),
}


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_float32_implementations_match_the_float64_reference(name):
  q, k, v, seg = inputs()
  got = values_and_grads(lambda q, k, v: IMPLEMENTATIONS[name](q, k, v, seg), q, k, v)
  assert_close(got, WANT, 2e-5)


@pytest.mark.parametrize("impl", ["xla", "blocked", "native"])
def test_the_load_balanced_order_on_one_device(impl):
  """The tokens in the load-balanced order of 4 context shards (8 chunks of 32; slots 2i and 2i + 1 hold
  chunks i and 7 - i), masked by their natural positions: the same attention, each row in its new slot.
  One device holds all 8 pieces (blocked: query blocks of 16 inside them)."""
  q, k, v, seg = inputs()
  bal = lambda x: token_order.balance(x, 4)
  mask = attention.Mask(bal(seg), impl, 16, 32, balanced=4)
  fn = lambda q, k, v: token_order.restore(attention.core(bal(q), bal(k), bal(v), mask, "float32"), 4)
  assert_close(values_and_grads(fn, q, k, v), WANT, 2e-5)


def test_blocked_is_exact_in_float64_and_without_documents():
  with jax.enable_x64():
    q, k, v, seg = inputs(jnp.float64)
    blocked = lambda seg: lambda q, k, v: attention.core(q, k, v, attention.Mask(seg, "blocked", 64, 32), "float64")
    assert_close(values_and_grads(blocked(seg), q, k, v), WANT, 1e-12)
    causal = values_and_grads(lambda q, k, v: reference(q, k, v, jnp.ones((B, S), jnp.int32)), q, k, v)
    assert_close(values_and_grads(blocked(None), q, k, v), causal, 1e-12)


def native(seg):
  return lambda q, k, v: attention.core(q, k, v, attention.Mask(seg, "native"), "float32")


def test_native_where_its_tiles_do_not_fit():
  """S 100 and H 24 (its query blocks are 64 rows, its tiles 16 or 32 columns), 6 heads on 3; a document
  id that recurs after another one (its keys are allowed, across the gap); bf16 in, bf16 out."""
  rng = np.random.default_rng(1)
  shapes = [(2, 100, 6, 24), (2, 100, 3, 24), (2, 100, 3, 24)]
  q, k, v = (rng.standard_normal(shape) for shape in shapes)
  seg = np.ones((2, 100), np.int32)
  seg[0, 30:70], seg[1, 90:] = 2, 0
  with jax.enable_x64():
    want = [np.asarray(x) for x in jax.vjp(lambda q, k, v: reference(q, k, v, jnp.asarray(seg)), q, k, v)[1](
        np.cos(np.arange(24.0)) * np.ones((2, 100, 6, 1)))]
    want.insert(0, np.asarray(reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(seg))))
  f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
  out, vjp = jax.vjp(native(jnp.asarray(seg)), *f32)
  got = [out, *vjp(jnp.asarray(np.cos(np.arange(24.0)) * np.ones((2, 100, 6, 1)), jnp.float32))]
  assert_close([np.asarray(x, np.float64) for x in got], want, 2e-5)
  bf16 = native(jnp.asarray(seg))(*(x.astype(jnp.bfloat16) for x in f32))
  assert bf16.dtype == jnp.bfloat16
  assert np.abs(np.asarray(bf16, np.float64) - want[0]).max() <= 2e-2 * np.abs(want[0]).max()


def test_native_gradient_matches_finite_differences():
  """<grad, d> against (f(x + eps d) - f(x - eps d)) / 2 eps of the kernel itself, float32, eps 1e-2:
  truncation O(eps^2) and rounding O(1e-7 / eps) are both below the 1e-3 relative tolerance."""
  q, k, v, seg = (x[:, :72] for x in inputs())
  weights = jnp.sin(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
  loss = lambda q, k, v: jnp.sum(native(seg)(q, k, v) * weights)
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  directions = [jnp.asarray(np.random.default_rng(i).standard_normal(x.shape), jnp.float32) for i, x in
                enumerate((q, k, v))]
  eps = 1e-2
  plus = loss(*(x + eps * d for x, d in zip((q, k, v), directions)))
  minus = loss(*(x - eps * d for x, d in zip((q, k, v), directions)))
  numeric = float(plus - minus) / (2 * eps)
  analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(grads, directions))
  assert abs(numeric - analytic) <= 1e-3 * abs(analytic), (numeric, analytic)


def _avals(jaxpr):
  """Every intermediate shape of a jaxpr and its sub-jaxprs (scan/while/custom_vjp bodies)."""
  for eqn in jaxpr.eqns:
    yield from (v.aval.shape for v in eqn.outvars if hasattr(v.aval, "shape"))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _avals(inner)


def test_blocked_builds_no_sequence_by_sequence_array():
  """Forward and backward: no [.., S, S] array anywhere (the largest score block is [.., 32, 64])."""
  q, k, v, seg = inputs()
  loss = lambda q, k, v: attention.core(q, k, v, attention.Mask(seg, "blocked", 32, 64), "float32").sum()
  shapes = list(_avals(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr))
  assert shapes and not [s for s in shapes if list(s).count(S) >= 2 or (len(s) >= 2 and s[-2:] == (S, S))]
  xla_shapes = _avals(jax.make_jaxpr(jax.grad(lambda q, k, v: attention.xla(q, k, v, seg).sum()))(q, k, v).jaxpr)
  assert any(s[-2:] == (S, S) for s in xla_shapes)  # the check does see the dense path's scores


@pytest.mark.parametrize("impl, platform, dtype, documents, context, want, says_why", [
    ("auto", "cpu", "float32", True, 1, "native", False),
    ("auto", "cpu", "float64", True, 1, "blocked", True),  # native is float32
    ("auto", "tpu", "bfloat16", True, 4, "splash", False),
    ("auto", "cuda", "bfloat16", False, 1, "cudnn", False),
    ("auto", "cuda", "bfloat16", True, 1, "pallas_gpu", False),  # GPU training: documents in every row
    ("auto", "gpu", "float32", True, 1, "pallas_gpu", False),
    ("auto", "gpu", "float64", True, 1, "blocked", True),
    ("auto", "gpu", "bfloat16", True, 2, "blocked", True),  # the GPU kernels run whole sequences only
    ("cudnn", "gpu", "bfloat16", True, 1, "pallas_gpu", True),  # cudnn cannot express documents
    ("cudnn", "gpu", "float32", False, 1, "pallas_gpu", True),  # nor float32
    ("xla", "tpu", "bfloat16", True, 1, "xla", False),
    ("native", "cpu", "bfloat16", True, 1, "native", False),  # computed in float32
    ("native", "cpu", "float64", True, 1, "blocked", True),  # float64 checks stay exact in float64
])
def test_resolution_per_backend(impl, platform, dtype, documents, context, want, says_why):
  chosen, note = attention.resolve(impl, platform, dtype, documents, context)
  assert (chosen, bool(note)) == (want, says_why)


@pytest.mark.parametrize("overrides, field", [
    ({"model.attention": "flash"}, "model.attention"),
    ({"model.attention_block_q": 48}, "model.attention_block_q"),  # 48 does not tile 128
    ({"model.attention_block_kv": -1}, "model.attention_block_kv"),
    ({"model.attention": "cudnn"}, "model.attention"),  # cudnn with float32 compute
])
def test_bad_attention_config_names_the_field(overrides, field):
  cfg = tiny_config()
  cfg.train.seq_len = 128
  for key, value in overrides.items():
    section, name = key.split(".")
    cfg[section][name] = value
  with pytest.raises(ConfigError, match=rf"config\.{field}: .*Fix: "):
    validate(cfg, 1)


@pytest.mark.parametrize("impl, platform, seq_len, context, block_q, field, message", [
    ("splash", "cpu", 128, 1, 0, "model.attention", "'splash' does not run on cpu devices"),
    ("cudnn", "tpu", 128, 1, 0, "model.attention", "'cudnn' does not run on tpu devices"),
    ("pallas_gpu", "cpu", 128, 1, 0, "model.attention", "'pallas_gpu' does not run on cpu devices"),
    ("splash", "tpu", 96, 1, 0, "model.attention", "multiples of 128"),  # splash tiles by 128
    ("native", "tpu", 128, 1, 0, "model.attention", "'native' does not run on tpu devices"),
    ("pallas_gpu", "gpu", 256, 2, 0, "model.attention", "pallas_gpu runs whole sequences"),  # no query offset
    ("pallas_gpu", "gpu", 200, 1, 0, "train.seq_len", "pallas_gpu tiles the sequence by 128"),
    ("splash", "tpu", 256, 2, 0, "model.attention", "in chunks of 64"),  # 256 / (2 x 2) < 128
    ("blocked", "cpu", 384, 4, 32, "model.attention_block_q", "32 does not tile the load-balanced chunks of 48"),
])
def test_backend_checks_at_start_up(impl, platform, seq_len, context, block_q, field, message):
  """One line naming the field and the fix, before anything compiles (the trainer resolves on its mesh)."""
  cfg = tiny_config(attention=impl, compute_dtype="bfloat16", attention_block_q=block_q)
  cfg.train.seq_len = seq_len
  with pytest.raises(ConfigError, match=rf"^config\.{field}: [^\n]*Fix: [^\n]*\.$") as e:
    resolve_attention(cfg, platform, context)
  assert message in str(e.value)


def test_native_without_a_compiler_is_a_start_up_error(monkeypatch, caplog):
  monkeypatch.setenv("CXX", "/nonexistent/g++")
  native_attention._load.cache_clear()
  try:
    with pytest.raises(ConfigError, match=r"config\.model\.attention: 'native' on cpu: native cannot run here: no "
                                          r"C\+\+ compiler .*Fix: install a C\+\+ compiler"):
      resolve_attention(tiny_config(attention="native"), "cpu")
    with caplog.at_level("WARNING", logger="loopjax"):
      assert resolve_attention(tiny_config(), "cpu").model.attention == "blocked"  # auto falls back
    assert "auto would take native, but no C++ compiler" in caplog.text
  finally:
    monkeypatch.undo()
    native_attention._load.cache_clear()
  assert resolve_attention(tiny_config(attention="native"), "cpu").model.attention == "native"


def test_auto_falls_back_to_blocked_where_splash_cannot_tile(caplog):
  """An explicit splash at seq 96 is an error (above); auto takes blocked instead, and says why."""
  cfg = tiny_config(compute_dtype="bfloat16")
  cfg.train.seq_len = 96
  with caplog.at_level("WARNING", logger="loopjax"):
    assert resolve_attention(cfg, "tpu").model.attention == "blocked"
  assert "auto would take splash, but splash needs" in caplog.text
  cfg.train.seq_len = 256
  assert resolve_attention(cfg, "tpu").model.attention == "splash"


def test_gpu_training_takes_the_pallas_kernel(caplog):
  """Training rows carry documents: auto on GPU is pallas_gpu, and blocked under context parallelism
  (the GPU kernels run whole sequences), saying why."""
  cfg = tiny_config(compute_dtype="bfloat16")
  cfg.train.seq_len = 128
  assert resolve_attention(cfg, "cuda").model.attention == "pallas_gpu"
  with caplog.at_level("WARNING", logger="loopjax"):
    assert resolve_attention(cfg, "cuda", 2).model.attention == "blocked"
  assert "the GPU kernels run whole sequences and mesh.context=2 splits them" in caplog.text


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="GPU only: the compiled Triton kernel (interpret mode above)")
def test_pallas_gpu_compiled_on_a_gpu():
  """The same case as the float32 table, compiled for the GPU (bf16 in: a bf16 tolerance)."""
  q, k, v, seg = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in inputs())
  got = values_and_grads(lambda q, k, v: gpu_attention.pallas_gpu(q, k, v, seg), q, k, v)
  assert_close(got, WANT, 2e-2)


def test_training_logs_and_records_the_resolved_implementation(tmp_path, caplog):
  cfg = tiny_config()
  cfg.train.steps, cfg.train.log_every, cfg.train.batch_size = 2, 1, 8
  with caplog.at_level("INFO", logger="loopjax"):
    result = train(cfg, str(tmp_path))
  assert "seq 16, batch 8, 2 layers, attention native (model.attention=auto)" in caplog.text  # the compile line
  with open(result.metrics_path) as f:
    rows = [json.loads(line) for line in f]
  assert rows[0]["attention"] == "native" and "attention" not in rows[1]
