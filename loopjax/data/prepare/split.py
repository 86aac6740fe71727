"""Which split a document goes to, and how a document is cut into records.

Held out by a hash of the text, not by position or a random draw: the choice depends on nothing but
the document, so it is the same on every re-run, on every runner and with any number of workers, and
two copies of one document (common in web corpora) land in the same split, so a duplicate of a
validation document is never trained on.

Chunks exist for the training order, not for the model: the loader shuffles records, and a long
document stored as one record fills many consecutive rows (one 27 KB source file spans ~26 batches of
1,024 tokens), so consecutive batches are correlated. Stored as chunks of `chunk_tokens` targets, its
pieces are shuffled apart like any other records. Each chunk repeats the previous chunk's last token
as its first, which is an input only, so every target of the document is trained on exactly once; the
price is that a chunk does not see the text before it (the same as packing's cut of a long document).
"""

import hashlib

import numpy as np

from loopjax.data import records

TRAIN, VALIDATION = "train", records.VALIDATION  # VALIDATION is also the split's directory under the corpus


def split_of(text: str, validation_fraction: float) -> str:
  """VALIDATION for the share `validation_fraction` of documents picked by a hash of the text."""
  if validation_fraction <= 0:
    return TRAIN
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
  return VALIDATION if int.from_bytes(digest, "big") < validation_fraction * 2**64 else TRAIN


def chunks(ids: np.ndarray, chunk_tokens: int) -> list[np.ndarray]:
  """A document's token ids (len >= 2) as records of at most chunk_tokens targets (0: one record)."""
  targets = len(ids) - 1
  if chunk_tokens <= 0 or targets <= chunk_tokens:
    return [ids]
  return [ids[start:start + chunk_tokens + 1] for start in range(0, targets, chunk_tokens)]
