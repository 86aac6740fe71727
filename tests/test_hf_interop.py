"""Hugging Face in and out on the released-code fixture (tests/fixtures/ouro_tiny_mha/hf).

Round trips: fixture -> import -> export is bit for bit (float32, and bfloat16 in shards); import ->
`loopjax train` -> export -> `load_ouro` gives the checkpoint's own logits; import -> `loopjax upscale`
-> train runs; init.from_hf / init.from_checkpoint land on this run's mesh and dtype. Bad input is one
clear error and leaves nothing under the output name.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.flax
import tokenizers
from flax import nnx

from conftest import OURO_FIXTURE, SUBPROCESS_CACHE
from helpers import merged_model, random_params, tiny_config
from loopjax.checkpoint import Checkpointer, CheckpointError, restore_params
from loopjax.config import ConfigError, config_from_dict, load_config_file
from loopjax.data import prepare
from loopjax.hf import HFError, load_ouro, model_config_from_hf, params_from_hf
from loopjax.hf import card
from loopjax.hf.export import export_checkpoint
from loopjax.hf.tensorfile import INDEX, TensorDir
from loopjax.train.init_from import initial_state
from loopjax.train.driver import write_start_checkpoint
from loopjax.train.trainer import build_trainer, make_mesh

HF = os.path.join(OURO_FIXTURE, "hf")
LOOPJAX = os.path.join(os.path.dirname(sys.executable), "loopjax")
# The fixture's model (vocab 320, hidden 64, 2 layers, 4 heads of 16, MLP 160, T=4) on Mano data (32 ids at 3 operations).
CONFIG = """
from loopjax.config import default_config

def get_config():
  c = default_config()
  m = c.model
  m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads = 320, 64, 2, 4, 4
  m.head_dim, m.mlp_dim, m.loop_steps = 16, 160, 4
  c.data.mano_max_ops = 3
  c.train.batch_size, c.train.seq_len, c.train.steps, c.train.log_every, c.train.progress = 2, 32, 5, 1, False
  c.optim.warmup_steps, c.optim.decay_steps = 1, 1
  return c
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("config") / "fixture_model.py"
  path.write_text(CONFIG)
  return str(path)


def run_config(config_file: str, **init):
  """The config in-process: batch 8 for the 8 test devices, `init` keys set."""
  cfg = load_config_file(config_file)
  cfg.train.batch_size = 8
  cfg.checkpoint.async_save = False
  cfg.init.update(init)
  return cfg


@pytest.fixture(scope="module")
def imported(tmp_path_factory, config_file) -> str:
  """A workdir whose step-0 checkpoint is the fixture, imported in float32."""
  workdir = str(tmp_path_factory.mktemp("imported"))
  write_start_checkpoint(run_config(config_file, from_hf=HF), workdir)
  return workdir


def read_json(*path) -> dict:
  with open(os.path.join(*map(str, path))) as f:
    return json.load(f)


def fixture_params() -> dict:
  """The fixture's weights in loopjax's layout (float32 numpy)."""
  return params_from_hf(TensorDir(HF), model_config_from_hf(read_json(HF, "config.json")))


def assert_same_tensors(ours: TensorDir, theirs: TensorDir):
  """Every tensor present in both, with the same dtype, shape and bytes."""
  assert sorted(ours) == sorted(theirs)
  for name in theirs:
    a, b = ours[name], theirs[name]
    assert (a.dtype, a.shape) == (b.dtype, b.shape), name
    assert a.tobytes() == b.tobytes(), name


def background(*argv) -> subprocess.Popen:
  """`loopjax ARGV` started in a subprocess (CPU only: libtpu's start-up lines stay out of stderr)."""
  return subprocess.Popen([LOOPJAX, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def finished(proc: subprocess.Popen) -> str:
  """The stdout of a command that must succeed."""
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  return out


def loopjax(*argv) -> str:
  return finished(background(*argv))


def test_import_then_export_is_bit_exact(imported, tmp_path):
  out = tmp_path / "out"
  summary = export_checkpoint(imported, str(out))
  assert summary["step"] == 0 and summary["files"] == ["model.safetensors"]
  assert_same_tensors(TensorDir(str(out)), TensorDir(HF))
  reference = TensorDir(HF)
  with safetensors.safe_open(str(out / "model.safetensors"), "numpy") as f:  # the safetensors library reads it too
    assert f.metadata() == {"format": "pt"}
    for name in reference:
      np.testing.assert_array_equal(f.get_tensor(name), reference[name])
  config, released = read_json(out, "config.json"), read_json(HF, "config.json")
  for key in ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
              "total_ut_steps", "tie_word_embeddings", "layer_types", "hidden_act", "early_exit_threshold"):
    assert config[key] == released[key], key
  assert config["torch_dtype"] == "float32" and "AutoModelForCausalLM" in config["auto_map"]
  assert {"README.md", "generation_config.json"} <= set(os.listdir(out))
  assert os.listdir(tmp_path) == ["out"]  # no temporary directory left beside it


def test_bfloat16_round_trip_through_shards(tmp_path, config_file):
  """A bf16 HF directory (written by the safetensors library) -> bf16 run -> sharded export: same bits,
  and `load_ouro` loads it back as bfloat16."""
  source = tmp_path / "hf_bf16"
  source.mkdir()
  config = read_json(HF, "config.json") | {"torch_dtype": "bfloat16"}
  (source / "config.json").write_text(json.dumps(config))
  reference = TensorDir(HF)
  safetensors.flax.save_file({k: jnp.asarray(reference[k], jnp.bfloat16) for k in reference},
                             str(source / "model.safetensors"), metadata={"format": "pt"})
  cfg = run_config(config_file, from_hf=str(source))
  cfg.model.param_dtype = "bfloat16"
  write_start_checkpoint(cfg, str(tmp_path / "w"))
  out = tmp_path / "out"
  summary = export_checkpoint(str(tmp_path / "w"), str(out), max_shard_bytes=60_000)
  assert summary["dtype"] == "bfloat16" and len(summary["files"]) > 1
  assert (out / INDEX).is_file() and set(summary["files"]) <= set(os.listdir(out))
  exported = TensorDir(str(out))
  assert_same_tensors(exported, TensorDir(str(source)))
  assert {t.dtype for t in exported.infos.values()} == {np.dtype(ml_dtypes.bfloat16)}
  assert read_json(out, "config.json")["torch_dtype"] == "bfloat16"
  params = nnx.state(load_ouro(str(out)), nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, config_file) -> dict:
  """`loopjax import-hf` of the fixture into W, then side by side (two cores): `loopjax train` W for 5 steps,
  and `loopjax upscale` of W's step 0 to 4 layers followed by 3 steps of training."""
  root = tmp_path_factory.mktemp("cli")
  workdir, grown = root / "w", root / "grown"
  assert "imported" in loopjax("import-hf", "--hf", HF, "--config", config_file, "--workdir", workdir) and (workdir / "checkpoints" / "0").is_dir()
  train = background("train", "--config", config_file, "--workdir", workdir,
                     f"--compile_cache={SUBPROCESS_CACHE}")
  loopjax("upscale", "--from", workdir / "checkpoints", "--to", grown / "checkpoints", "--layers", "4", "--step", "0")
  train_grown = background("train", "--config", config_file, "--workdir", grown, "--config.model.num_layers=4",
                           "--config.train.steps=3", f"--compile_cache={SUBPROCESS_CACHE}")
  return {"workdir": str(workdir), "train": finished(train), "train_grown": finished(train_grown)}


def test_import_train_export_gives_the_checkpoints_logits(cli_runs, tmp_path):
  assert "finished at step 5" in cli_runs["train"]
  out = tmp_path / "hf"
  loopjax("export-hf", "--checkpoint", cli_runs["workdir"], "--output", out)
  restored = restore_params(os.path.join(cli_runs["workdir"], "checkpoints"), step=5)
  model_cfg = config_from_dict(restored.meta["config"]).model
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 320, (2, 24)), jnp.int32)
  ours = merged_model(model_cfg, restored.items["params"])(tokens)
  theirs = load_ouro(str(out))(tokens)
  scale = float(jnp.max(jnp.abs(ours.step_logits)))
  assert float(jnp.max(jnp.abs(theirs.step_logits - ours.step_logits))) <= 1e-5 * scale
  np.testing.assert_allclose(theirs.gate_logits, ours.gate_logits, rtol=1e-5, atol=1e-6)
  trained = restored.items["params"]["stack"]["wq"]
  assert not np.array_equal(trained, fixture_params()["stack"]["wq"])  # the 5 steps changed the weights


def test_import_upscale_train(cli_runs):
  assert "finished at step 3" in cli_runs["train_grown"]


def test_init_from_checkpoint_lands_in_this_runs_mesh_and_dtype(imported, config_file):
  """float32 source, bfloat16 FSDP run: the same values rounded once; fresh optimizer state."""
  cfg = run_config(config_file, from_checkpoint=f"{imported}:0")
  cfg.model.param_dtype, cfg.mesh.fsdp = "bfloat16", 2
  trainer = build_trainer(cfg, make_mesh(cfg))
  state = initial_state(trainer)
  expected = jax.tree.map(lambda x: np.asarray(x, ml_dtypes.bfloat16), fixture_params())
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params, expected)
  assert jax.tree.map(lambda x: x.sharding, state.params) == trainer.state_shardings.params
  assert int(state.step) == 0 and not any(np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state))


def test_init_from_hf_gives_the_released_weights(config_file):
  trainer = build_trainer(run_config(config_file, from_hf=HF), make_mesh(run_config(config_file)))
  params = initial_state(trainer).params
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, fixture_params())


def _break(case: str, hf, cfg):
  """Damages the copied HF directory `hf` (or the config) as `case` says."""
  config = read_json(hf, "config.json")
  if case == "missing config.json":
    os.remove(hf / "config.json")
  elif case == "missing safetensors":
    os.remove(hf / "model.safetensors")
  elif case == "other model_type":
    (hf / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
  elif case == "model differs":
    cfg.model.num_layers, cfg.model.mlp_dim = 3, 128
  elif case == "tensor shapes differ":
    (hf / "config.json").write_text(json.dumps(config | {"intermediate_size": 128}))
    cfg.model.mlp_dim = 128
  elif case == "truncated":
    path = hf / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("case, error, message", [
    ("missing config.json", HFError, r"config.json does not exist. Fix:"),
    ("missing safetensors", HFError, r"no model.safetensors.*Fix:"),
    ("other model_type", HFError, r"model_type 'llama'; loopjax imports 'ouro'. Fix:"),
    ("model differs", ConfigError, r"model.num_layers=3 but num_hidden_layers=2; model.mlp_dim=128 but "
                                   r"intermediate_size=160. Fix: --config.model.num_layers=2 --config.model.mlp_dim=160"),
    ("tensor shapes differ", HFError, r"6 tensor\(s\) do not fit.*mlp.gate_proj.weight is \(160, 64\), the config "
                                      r"needs \(128, 64\).*Fix:"),
    ("truncated", HFError, r"model.safetensors is truncated: tensor .* Fix:"),
])
def test_bad_hf_input_is_one_clear_error_and_writes_nothing(case, error, message, tmp_path, config_file):
  hf = tmp_path / "hf"
  shutil.copytree(HF, hf)
  os.chmod(hf, 0o755)
  for name in os.listdir(hf):
    os.chmod(hf / name, 0o644)
  cfg = run_config(config_file, from_hf=str(hf))
  _break(case, hf, cfg)
  with pytest.raises(error, match=message):
    write_start_checkpoint(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_export_refuses_a_non_empty_output_unless_overwrite(imported, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  with pytest.raises(HFError, match="exists and is not empty. Fix: .*--overwrite"):
    export_checkpoint(imported, str(out))
  assert os.listdir(out) == ["notes.txt"]
  export_checkpoint(imported, str(out), overwrite=True)
  assert "notes.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
  assert os.listdir(tmp_path) == ["out"]


def test_export_of_a_damaged_checkpoint_leaves_nothing(imported, tmp_path):
  damaged = tmp_path / "checkpoints"
  shutil.copytree(os.path.join(imported, "checkpoints"), damaged)
  meta_file = damaged / "0" / "meta" / "metadata"
  meta = read_json(meta_file)
  meta["checksums"]["params"] = (meta["checksums"]["params"] + 1) % 2**32
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match="fail their checksum"):
    export_checkpoint(str(damaged), str(tmp_path / "out"))
  assert os.listdir(tmp_path) == ["checkpoints"]


def test_export_refuses_loop_residual(tmp_path):
  cfg = tiny_config(kind="loop_residual", num_kv_heads=4)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(0, {"params": jax.tree.map(jnp.asarray, random_params(cfg.model))},
            meta={"phase": "main", "config": json.loads(cfg.to_json())})
  ckpt.close()
  with pytest.raises(HFError, match="'loop_residual' has no Hugging Face format"):
    export_checkpoint(str(tmp_path), str(tmp_path / "out"))
  assert os.listdir(tmp_path) == ["checkpoints"]


def _chat_tokenizer(path) -> str:
  vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "[UNK]": 3, "a": 4, "b": 5}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(path))
  return str(path)


def test_tokenizer_is_shipped_given_or_found_beside_the_runs_corpus(imported, tmp_path, config_file):
  tokenizer = _chat_tokenizer(tmp_path / "tokenizer.json")
  out = tmp_path / "out"
  export_checkpoint(imported, str(out), tokenizer=tokenizer)
  config = read_json(out, "config.json")
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
  assert read_json(out, "generation_config.json")["eos_token_id"] == 2
  assert (out / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
  (tmp_path / "docs.jsonl").write_text('{"text": "a b a"}\n{"text": "b b"}\n')
  corpus = tmp_path / "corpus"
  prepare.prepare([str(tmp_path / "docs.jsonl")], str(corpus), prepare.Options(tokenizer=tokenizer))
  cfg = run_config(config_file)
  cfg.data.source = str(corpus)
  assert card.find_tokenizer(cfg, None) == str(corpus / "tokenizer.json")
  assert card.special_ids(cfg, None)["bos_token_id"] == 0  # no tokenizer: the corpus' document start


def test_cli_errors_are_one_line(tmp_path, config_file):
  other = tmp_path / "hf"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
  procs = [background("import-hf", "--hf", other, "--config", config_file, "--workdir", tmp_path / "w"),
           background("export-hf", "--checkpoint", tmp_path / "none", "--output", tmp_path / "out")]
  for proc, expected in zip(procs, ("model_type 'llama'", "no complete checkpoint")):
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
  assert sorted(os.listdir(tmp_path)) == ["hf"]
