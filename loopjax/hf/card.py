"""What an export ships besides the weights: the tokenizer, its special token ids, generation_config.json
and a model card (README.md).

The tokenizer is the one given, else the one `loopjax prepare` kept beside the run's corpus (checked
against the sha256 in its manifest). Token ids come from the tokenizer, not from a default of 0 for all
three: tokenizer_config.json's bos/eos/pad tokens when it sits beside tokenizer.json, else the first of
the usual names present (ChatML first: the SmolLM2 tokenizer Ouro uses gives bos 1 <|im_start|>, eos 2
<|im_end|>, pad 0 <|endoftext|>). Without a tokenizer (built-in tasks, byte-level corpora) the run's
document-start id serves as bos and eos (documents are separated by it) and pad is 0, loopjax's padding.
The corpus and the tokenizer may be local or gs:// (read through epath, like the corpus itself).
"""

import json

import tokenizers
from etils import epath

from loopjax import storage
from loopjax.data import pipeline, records, synthetic, tasks
from loopjax.hf.errors import HFError

TOKENIZER_FILES = (records.TOKENIZER, "tokenizer_config.json", "special_tokens_map.json")
CANDIDATES = {"bos": ("<|im_start|>", "<s>", "<bos>", "<|begin_of_text|>", "<|endoftext|>"),
              "eos": ("<|im_end|>", "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>"),
              "pad": ("<|endoftext|>", "<pad>", "<|pad|>")}


def find_tokenizer(cfg, given: str | None) -> str | None:
  """The tokenizer.json to ship with a run's export, or None when the run has none to find."""
  if given:
    if not epath.Path(given).is_file():
      raise HFError(f"--tokenizer {given}: no such file. Fix: give the tokenizer.json the run's data was prepared with")
    return given
  for source in _corpora(cfg):
    path = epath.Path(source) / records.TOKENIZER
    if path.is_file() and records.sha256_file(path) == records.read_manifest(source)["tokenizer"]["sha256"]:
      return str(path)
  return None


def _corpora(cfg) -> list[str]:
  return [s for s in pipeline.source_names(cfg.data) if s not in tasks.TASK_NAMES and epath.Path(s).is_dir()]


def special_ids(cfg, tokenizer: str | None) -> dict:
  """bos/eos/pad token ids for config.json and generation_config.json (see the module docstring)."""
  if tokenizer is None:
    corpora = _corpora(cfg)
    start = records.read_manifest(corpora[0])["tokenizer"]["bos_id"] if corpora else synthetic.BOS
    return {"bos_token_id": start, "eos_token_id": start, "pad_token_id": synthetic.PAD}
  tok = tokenizers.Tokenizer.from_str(epath.Path(tokenizer).read_text())
  configured = _configured_tokens(epath.Path(tokenizer).parent)
  ids = {}
  for role, names in CANDIDATES.items():
    found = (tok.token_to_id(n) for n in (configured.get(role), *names) if n)
    ids[f"{role}_token_id"] = next((i for i in found if i is not None), None)
  if ids["pad_token_id"] is None:
    ids["pad_token_id"] = ids["eos_token_id"]
  return ids


def _configured_tokens(directory: str) -> dict:
  """bos/eos/pad token strings from a tokenizer_config.json beside the tokenizer (values may be dicts)."""
  path = epath.Path(directory) / "tokenizer_config.json"
  if not path.is_file():
    return {}
  config = json.loads(path.read_text())
  tokens = {role: config.get(f"{role}_token") for role in CANDIDATES}
  return {role: t["content"] if isinstance(t, dict) else t for role, t in tokens.items() if t}


def copy_tokenizer(tokenizer: str, output: str):
  """tokenizer.json and the tokenizer_config.json / special_tokens_map.json beside it, if any."""
  storage.copy_file(tokenizer, epath.Path(output) / records.TOKENIZER)
  for name in TOKENIZER_FILES[1:]:
    path = epath.Path(tokenizer).parent / name
    if path.is_file():
      storage.copy_file(path, epath.Path(output) / name)


def generation_config(ids: dict) -> dict:
  return {"_from_model_config": True, **ids}


def model_card(cfg, *, step: int, source: str, dtype: str, num_params: int, tokenizer: str | None) -> str:
  """README.md: what the export is, how to load it, and the run that produced it."""
  m = cfg.model
  data = ", ".join(_data_names(cfg))
  return f"""---
library_name: transformers
tags: [ouro, looped-language-model, loopjax]
---
# Ouro (LoopLM) exported by loopjax

Step {step} of the loopjax checkpoint `{source}`, {num_params:,} parameters in {dtype}: {m.num_layers} layers
applied {m.loop_steps} times per token (T), hidden {m.hidden_size}, {m.num_heads} heads ({m.num_kv_heads} KV) of
{m.head_dim}, MLP {m.mlp_dim}, vocabulary {m.vocab_size}, RoPE base {m.rope_base:g}, trained at sequence length
{cfg.train.seq_len}. Tokenizer: {"included" if tokenizer else "none recorded in the run (not included)"}.

## Loading

loopjax ships no model code. vLLM serves `OuroForCausalLM` natively. transformers runs the released Ouro
repository's remote code, which `auto_map` in config.json points at:

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("<this directory>", trust_remote_code=True, torch_dtype="auto")
```

`total_ut_steps` in config.json is the loop count T; the released code reads it at load time.

## Training run

Data: {data}. Resolved loopjax config of the checkpoint:

```json
{cfg.to_json(indent=1, sort_keys=True)}
```
"""


def _data_names(cfg) -> list[str]:
  """Each source with, for a prepared corpus, its manifest's token count and tokenizer kind."""
  names = []
  for source in pipeline.source_names(cfg.data):
    if source in tasks.TASK_NAMES or not epath.Path(source).is_dir():
      names.append(f"`{source}`")
    else:
      manifest = records.read_manifest(source)
      names.append(f"`{source}` ({manifest['tokens']:,} tokens, {manifest['tokenizer']['kind']} tokenizer)")
  return names
