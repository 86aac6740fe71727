"""Tokenizers for `prepare`: the built-in byte-level one (no file) and any HF `tokenizers` JSON file.

Each tokenizer has an identity (kind, file hash, vocabulary size, document-start id) that goes into
the manifest, so a corpus can be checked against the model and against other corpora in a mixture.
Documents get the tokenizer's document-start token prepended, so their first real token is a target.
"""

import hashlib

import numpy as np
import tokenizers

from loopjax import storage

BYTE = "byte"
DEFAULT_BOS_TOKENS = ("<|endoftext|>", "<s>", "<bos>", "<|begin_of_text|>")


class TokenizerError(ValueError):
  """A tokenizer that cannot be loaded or lacks a requested token; names the file and the fix."""


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, id 256 the document start."""

  vocab_size = 257
  bos_id = 256

  def identity(self) -> dict:
    return {"kind": BYTE, "vocab_size": self.vocab_size, "bos_id": self.bos_id, "sha256": None}

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.uint32) for t in texts]

  def decode(self, ids: list[int]) -> str:
    """Text of the byte ids (the document-start id and invalid UTF-8 become U+FFFD)."""
    return bytes(i if i < 256 else 0xFF for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
  """A `tokenizers` JSON file (local or gs://); encodes without its post-processor's special tokens."""

  def __init__(self, path: str, bos_token: str | None):
    file = storage.run_path(path)
    if not file.is_file():
      raise TokenizerError(f"tokenizer file {path!r} does not exist. Fix: give a tokenizer.json path "
                           "(local or gs://) or 'byte' for the built-in byte tokenizer")
    data = file.read_bytes()
    try:
      self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
      raise TokenizerError(f"{path!r} is not a HF tokenizers JSON file ({e}). Fix: give the "
                           "tokenizer.json of a HF tokenizer") from e
    self._sha256 = hashlib.sha256(data).hexdigest()
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = self._bos_id(path, bos_token)

  def _bos_id(self, path: str, bos_token: str | None) -> int | None:
    if bos_token == "":
      return None
    if bos_token is not None:
      bos_id = self._tok.token_to_id(bos_token)
      if bos_id is None:
        raise TokenizerError(f"tokenizer {path!r} has no token {bos_token!r}. Fix: pass a "
                             "--bos_token that is in its vocabulary, or --bos_token='' for none")
      return bos_id
    found = [self._tok.token_to_id(t) for t in DEFAULT_BOS_TOKENS]
    return next((i for i in found if i is not None), None)

  def identity(self) -> dict:
    return {"kind": "hf", "vocab_size": self.vocab_size, "bos_id": self.bos_id, "sha256": self._sha256}

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
    return [np.asarray(e.ids, np.uint32) for e in encodings]

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=False)


def load(spec: str, bos_token: str | None = None):
  """'byte' or a path to a tokenizer.json. bos_token: None = the usual start token if present."""
  if spec == BYTE:
    return ByteTokenizer()
  return HFTokenizer(spec, bos_token)


def with_bos(ids: np.ndarray, bos_id: int | None) -> np.ndarray:
  return ids if bos_id is None else np.concatenate([np.array([bos_id], np.uint32), ids])
