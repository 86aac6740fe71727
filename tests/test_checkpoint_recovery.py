"""Restore discards only what is proven damaged (loopjax/checkpoint/recovery.py), in-process.

Real Orbax checkpoints written by real tiny runs; the faults that cannot be produced on a local disk
on demand (a bucket's 503, a device out of memory) are injected as the exceptions those layers raise,
at the Checkpointer's restore. After every case the test checks that nothing was lost: every
checkpoint still in place and nothing moved to checkpoints-corrupt/ unless it was proven damaged.
"""

import glob
import json
import logging
import os
import shutil

import jax
import pytest
from helpers import tiny_config

from loopjax import checkpoint as ck
from loopjax.checkpoint import errors
from loopjax.train import driver


def _cfg(steps=6, **checkpoint):
  c = tiny_config()
  c.train.steps = steps
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  c.checkpoint.every_steps = 2
  c.optim.schedule = "constant"  # these runs are extended from 6 steps: the same LR at every step
  c.checkpoint.restore_retry_seconds = 0.01
  for key, value in checkpoint.items():
    setattr(c.checkpoint, key, value)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 6-step run with checkpoints at 2, 4 and 6, and its logged losses."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  driver.train(_cfg(), workdir)
  return workdir


def _copy(trained, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  return workdir


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _set_aside(workdir):
  corrupt = os.path.join(workdir, "checkpoints-corrupt")
  return sorted(d.split("-")[0] for d in os.listdir(corrupt)) if os.path.isdir(corrupt) else []


def _steps_logged(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def _fail_restore(monkeypatch, error: Exception, times: int | None):
  """Makes Checkpointer.restore raise `error` on its first `times` calls (None: always); counts calls."""
  calls = []
  real = ck.Checkpointer.restore

  def restore(self, step, *args, **kwargs):
    calls.append(step)
    if times is None or len(calls) <= times:
      raise error
    return real(self, step, *args, **kwargs)
  monkeypatch.setattr(ck.Checkpointer, "restore", restore)
  return calls


def _truncate_params(step_dir):
  """Halves every data file of the params item (which of them a restore reads depends on the layout)."""
  files = glob.glob(os.path.join(step_dir, "params", "**", "d", "*"), recursive=True)
  assert files
  for victim in files:
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 2)


def _orbax_wrapped(cause: Exception) -> Exception:
  """A storage error as it reaches loopjax: Orbax's generic Exception raised from tensorstore's."""
  error = Exception("Encountered error while reading array index: (slice(0, 2, 1),). See full TensorStore details")
  error.__cause__ = cause
  return error


def test_a_transient_error_once_is_retried_and_resumes_from_the_newest(trained, tmp_path, monkeypatch, caplog):
  workdir = _copy(trained, tmp_path)
  unavailable = ValueError('UNAVAILABLE: Error reading "params/manifest.ocdbt": HTTP response code: 503')
  calls = _fail_restore(monkeypatch, _orbax_wrapped(unavailable), times=1)
  caplog.set_level(logging.INFO, logger="loopjax")
  result = driver.train(_cfg(steps=8), workdir)
  assert result.step == 8
  assert "retrying" in caplog.text and "resumed from checkpoint step 6" in caplog.text
  assert calls == [6, 6], calls  # the newest, twice: the failure, then the retry
  assert _set_aside(workdir) == [] and 6 in _steps(workdir)
  assert _steps_logged(workdir) == list(range(1, 9))


def test_a_persistent_transient_error_ends_the_run_retryable_and_moves_nothing(trained, tmp_path, monkeypatch):
  workdir = _copy(trained, tmp_path)
  calls = _fail_restore(monkeypatch, ConnectionResetError(104, "Connection reset by peer"), times=None)
  with pytest.raises(ck.StorageUnavailableError, match=r"step 6 .* could not be read after 3 tries.*left in place"):
    driver.train(_cfg(steps=8, restore_retries=2), workdir)
  assert calls == [6, 6, 6]
  assert _steps(workdir) == [2, 4, 6] and _set_aside(workdir) == []
  assert ck.StorageUnavailableError.exit_code == 75


def test_out_of_memory_ends_the_run_and_moves_nothing(trained, tmp_path, monkeypatch):
  workdir = _copy(trained, tmp_path)
  oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2G")
  calls = _fail_restore(monkeypatch, oom, times=None)
  with pytest.raises(ck.CheckpointReadError, match=r"step 6 .*Out of memory.*nothing was moved"):
    driver.train(_cfg(steps=8), workdir)
  assert calls == [6]  # not retried, and no older checkpoint tried: it says nothing about the files
  assert _steps(workdir) == [2, 4, 6] and _set_aside(workdir) == []
  assert _steps_logged(workdir) == list(range(1, 7))  # nothing trained


def test_the_only_checkpoint_damaged_refuses_to_start_over_unless_allowed(tmp_path):
  workdir = str(tmp_path / "run")
  driver.train(_cfg(steps=2), workdir)
  _truncate_params(os.path.join(workdir, "checkpoints", "2"))
  with pytest.raises(ck.DamagedCheckpointError, match=r"no checkpoint .* restores \(step 2: OUT_OF_RANGE.*"
                                                       r"nothing was moved or trained.*allow_fresh_start=True"):
    driver.train(_cfg(steps=4), workdir)
  assert _steps(workdir) == [2] and _set_aside(workdir) == [] and _steps_logged(workdir) == [1, 2]
  result = driver.train(_cfg(steps=4, allow_fresh_start=True), workdir)
  assert result.step == 4 and _set_aside(workdir) == ["2"] and _steps_logged(workdir) == [1, 2, 3, 4]


def test_newest_damaged_falls_back_to_the_previous_and_sets_only_it_aside(trained, tmp_path, caplog):
  workdir = _copy(trained, tmp_path)
  _truncate_params(os.path.join(workdir, "checkpoints", "6"))
  result = driver.train(_cfg(steps=8), workdir)
  assert result.step == 8 and _set_aside(workdir) == ["6"]
  warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(warnings) == 1 and "\n" not in warnings[0] and "tensorstore_spec" not in warnings[0], warnings
  assert "checkpoint step 6 in" in warnings[0] and "OUT_OF_RANGE" in warnings[0]


@pytest.mark.parametrize("error, kind", [
    (ValueError('OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database: Requested byte range [0, 9) is not valid'),
     errors.DAMAGED),
    (ValueError('DATA_LOSS: Error decoding manifest: Length in header (115) does not match'), errors.DAMAGED),
    (json.JSONDecodeError("Unterminated string", "{", 0), errors.DAMAGED),
    (ck.DamagedCheckpointError("'params' fails its checksum"), errors.DAMAGED),
    (ValueError("UNAVAILABLE: HTTP response code: 503"), errors.TRANSIENT),
    (ValueError('Error reading "params/manifest.ocdbt": HTTP response code: 503'), errors.TRANSIENT),
    (OSError("GET https://storage.googleapis.com/b/o: status 429 rate limit"), errors.TRANSIENT),
    (ValueError("DEADLINE_EXCEEDED: deadline exceeded"), errors.TRANSIENT),
    (TimeoutError("timed out"), errors.TRANSIENT),
    (ConnectionResetError(104, "Connection reset by peer"), errors.TRANSIENT),
    (ValueError("RESOURCE_EXHAUSTED: Out of memory"), errors.OTHER),
    (TypeError("unsupported operand"), errors.OTHER),
    (ck.IncompatibleCheckpointError("does not fit this config"), errors.OTHER),
])
def test_classify_reads_the_status_codes_through_the_cause_chain(error, kind):
  try:
    try:
      raise error
    except Exception as e:
      raise Exception("Encountered error while reading array index") from e  # as Orbax wraps them
  except Exception as wrapped:
    assert errors.classify(wrapped) == kind


def test_a_number_in_orbaxs_spec_dump_is_not_an_http_status():
  """A truncated file read as "transient" in CI: Orbax's wrapper prints the array's TensorStore spec, and
  that checkpoint's random OCDBT uuid held "503"."""
  truncated = ValueError('OUT_OF_RANGE: Error reading "stack.w_up/0.0.0" in OCDBT database: Requested byte '
                         "range [131072, 212992) is not valid for value of size 189388")
  try:
    try:
      raise truncated
    except Exception as e:
      raise Exception("Encountered error while reading array index: (slice(0, 128, 1),). See full TensorStore "
                      "details: {'driver': 'ocdbt', 'config': {'uuid': 'f0450300035975092f3fac40a7b40150'}}") from e
  except Exception as wrapped:
    assert errors.classify(wrapped) == errors.DAMAGED
