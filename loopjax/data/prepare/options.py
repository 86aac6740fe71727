"""What `loopjax prepare` is asked to do, checked before anything is read or written.

Every field decides the bytes of the shards, so all of them are part of the corpus's identity: a re-run
with the same inputs and options finds its own corpus (and does nothing); with other options it finds a
different one (and refuses to overwrite it).
"""

import dataclasses

from loopjax.data import tokenizer

ON_BAD_RECORD = ("fail", "skip")


class PrepareError(ValueError):
  """A flag of `loopjax prepare` that cannot work; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Options:
  tokenizer: str = tokenizer.BYTE  # "byte" or a HF tokenizer.json (local path or gs://)
  text_field: str = "text"  # JSONL field / Parquet column holding the text
  txt_separator: str | None = None  # split .txt files into documents at this string (None: one per file)
  bos_token: str | None = None  # document-start token; None = the tokenizer's usual one, "" = none
  on_bad_record: str = "fail"  # "fail": stop on the first bad record; "skip": count it by reason, go on
  validation_fraction: float = 0.0  # documents held out into validation/, chosen by a hash of their text
  chunk_tokens: int = 0  # >0: store documents as records of at most this many targets (see split.py)

  def check(self):
    """Raises PrepareError naming the flag and the fix for a value that cannot work."""
    if self.on_bad_record not in ON_BAD_RECORD:
      raise PrepareError(f"--on_bad_record {self.on_bad_record!r} is not one of {ON_BAD_RECORD}. Fix: "
                         "use fail (stop on the first bad record) or skip (count and skip them)")
    if not 0.0 <= self.validation_fraction < 1.0:
      raise PrepareError(f"--validation_fraction {self.validation_fraction} is outside [0, 1). Fix: give "
                         "the share of documents to hold out, e.g. 0.001")
    if self.chunk_tokens < 0:
      raise PrepareError(f"--chunk_tokens {self.chunk_tokens} is negative. Fix: give train.seq_len, or 0 to "
                         "store whole documents")

  def identity(self) -> dict:
    """The options as the manifest records them (the tokenizer by its identity, not its path)."""
    fields = dataclasses.asdict(self)
    fields.pop("tokenizer")
    return fields
