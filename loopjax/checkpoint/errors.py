"""What went wrong with a checkpoint, and whether that proves it damaged.

A restore can fail for three kinds of reasons, and only one of them says anything about the files:

  damaged    positive evidence the checkpoint itself is bad: its checksum does not match, a file it
             needs is missing or truncated, a chunk or a metadata file does not decode. Only this
             kind may set a checkpoint aside.
  transient  the storage did not answer this time (a network error, a 5xx or 429 from a bucket, a
             timeout): retried with backoff, then the run ends and every checkpoint stays in place.
  other      anything else (a device out of memory, shapes the config does not fit, a bug): the run
             ends and nothing is moved; the checkpoint may be fine.

Tensorstore, which Orbax reads and writes arrays with, reports absl status codes at the start of its
messages ("OUT_OF_RANGE: Error reading ...") wrapped in Orbax's generic exceptions, so `classify`
walks an exception's whole cause chain and reads the codes there.

Every error here carries `exit_code` (loopjax/cli/errors.py lists the codes): 2 for a start-up refusal
the user fixes, 3 for a fault met during a run, 75 (EX_TEMPFAIL) for "run the same command again".
"""

import errno
import json
import re

DAMAGED, TRANSIENT, OTHER = "damaged", "transient", "other"

EXIT_REFUSED, EXIT_FAULT, EXIT_RETRY = 2, 3, 75

# absl status codes in tensorstore's messages. OUT_OF_RANGE: a byte range past a truncated file's end;
# DATA_LOSS: an undecodable manifest or chunk; NOT_FOUND: a file the checkpoint's index names is gone.
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND")
_TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED")
_STATUS = re.compile(r"^([A-Z_]{4,}): ")
# FAILED_PRECONDITION is also "the bucket's generation changed", so only its decoding messages count.
_DAMAGE_TEXT = ("Not enough data", "Error decoding", "Unterminated string", "not found in the checkpoint")
_TRANSIENT_TEXT = ("Service Unavailable", "Too Many Requests", "Bad Gateway", "Gateway Timeout", "Connection reset",
                   "timed out")
# An HTTP status only where the message says it is one: Orbax wraps errors in the array's whole TensorStore
# spec, whose random OCDBT uuid ('f0450300035975...') once held "503" and made a truncated file "transient".
_TRANSIENT_HTTP = re.compile(r"\b(?:HTTP|status|code)\b[^0-9\n]{0,24}\b(?:429|50[234])\b", re.IGNORECASE)
_TRANSIENT_ERRNO = (errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH,
                    errno.ECONNABORTED, errno.EPIPE)


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read; the message says what and what to do."""
  exit_code = EXIT_REFUSED


class IncompatibleCheckpointError(CheckpointError):
  """The checkpoint is readable but holds other shapes than the config asks for (never "damaged")."""


class NonFiniteStateError(CheckpointError):
  """The state to save holds NaN or Inf: nothing was written."""
  exit_code = EXIT_FAULT


class DamagedCheckpointError(CheckpointError):
  """Positive evidence that one checkpoint is bad (checksum, missing or truncated file, bad encoding)."""
  exit_code = EXIT_FAULT


class CheckpointWriteError(CheckpointError):
  """A save failed (disk full, permission denied, a bucket gone); earlier checkpoints are untouched."""
  exit_code = EXIT_FAULT


class CheckpointReadError(CheckpointError):
  """A restore failed for a reason that does not prove the checkpoint damaged; nothing was moved."""
  exit_code = EXIT_FAULT


class StorageUnavailableError(CheckpointReadError):
  """The storage kept failing transiently through every retry; nothing was moved, try again later."""
  exit_code = EXIT_RETRY


def causes(error: BaseException):
  """`error` and every exception it was raised from or while handling, outermost first."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _kind_of_one(error: BaseException) -> str | None:
  if isinstance(error, DamagedCheckpointError):
    return DAMAGED
  if isinstance(error, (CheckpointReadError, IncompatibleCheckpointError)):
    return OTHER
  if isinstance(error, (ConnectionError, TimeoutError)):
    return TRANSIENT
  if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNO:
    return TRANSIENT
  if isinstance(error, (FileNotFoundError, json.JSONDecodeError, EOFError)):
    return DAMAGED
  status = getattr(error, "code", None)  # gcsfs.HttpError, google.api_core errors: an HTTP status
  if isinstance(status, int) and (status == 429 or 500 <= status < 600):
    return TRANSIENT
  message = str(error)
  code = _STATUS.match(message)
  if code and code.group(1) in _TRANSIENT_CODES:
    return TRANSIENT
  if code and code.group(1) in _DAMAGE_CODES:
    return DAMAGED
  if any(text in message for text in _TRANSIENT_TEXT) or _TRANSIENT_HTTP.search(message):
    return TRANSIENT
  if any(text in message for text in _DAMAGE_TEXT):
    return DAMAGED
  return None


def classify(error: BaseException) -> str:
  """DAMAGED, TRANSIENT or OTHER for an exception met while restoring (see the module docstring).

  Transient wins over damage anywhere in the chain: a read cut short by the network can look like a
  truncated file, and a wrong "transient" costs a retry while a wrong "damaged" moves a good checkpoint.
  """
  kinds = {_kind_of_one(e) for e in causes(error)}
  return TRANSIENT if TRANSIENT in kinds else DAMAGED if DAMAGED in kinds else OTHER


def reason(error: BaseException, limit: int = 240) -> str:
  """One line on what failed: the innermost cause's message (tensorstore's status line, not the spec
  dump Orbax wraps around it), with whitespace collapsed and cut to `limit` characters."""
  inner = list(causes(error))[-1]
  text = " ".join(str(inner).split()) or type(inner).__name__
  text = text.split(" [tensorstore_spec")[0].split(" See full TensorStore details")[0]
  if len(text) <= limit:
    return text
  tail = limit * 2 // 3  # tensorstore's messages end with the OS's word ("No space left on device")
  return f"{text[:limit - tail - 5]} ... {text[-tail:]}"
