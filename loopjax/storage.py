"""Where a run's outputs live: a local directory or a gs:// prefix, as one path type (etils.epath).

Local paths are made absolute; gs:// URLs are kept as URLs (os.path.abspath would turn gs://b/x into
./gs:/b/x and write the run under the cwd). Orbax writes checkpoints through the same epath and
tensorstore; everything else a run writes goes through `append_line` and `Staged` below, since an
object store cannot append: a file is written whole, each time, as one object.

`check_run_dir` runs at start-up, before anything is compiled: an unknown scheme, an endpoint that
does not answer or a bucket the credentials cannot write each fail there with one line, not at the
first checkpoint. gs:// needs `gcsfs` (the `gcs` extra). A GCS emulator is used when
STORAGE_EMULATOR_HOST (gcsfs) and TENSORSTORE_GCS_HTTP_URL (tensorstore) point at it.
"""

import os
import shutil
import socket
import tempfile
import urllib.parse
import uuid

from etils import epath

REMOTE_SCHEMES = ("gs",)
_CONNECT_TIMEOUT_S = 5.0


class StorageError(RuntimeError):
  """A run directory cannot be used; the message names the flag and the fix."""


def scheme(path: str) -> str:
  """The URL scheme of `path` ("" for a local path)."""
  head, sep, _ = os.fspath(path).partition("://")
  return head if sep and "/" not in head else ""


def is_remote(path) -> bool:
  return scheme(os.fspath(path)) != ""


def run_path(path) -> epath.Path:
  """`path` as an epath: absolute if local, the URL itself if on an object store."""
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.abspath(path))


def _endpoint() -> tuple[str, int]:
  """(host, port) gcsfs talks to: the emulator's when STORAGE_EMULATOR_HOST is set, else Google's."""
  url = urllib.parse.urlparse(os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com")
  return url.hostname, url.port or (443 if url.scheme == "https" else 80)


def check_endpoint(path, flag: str):
  """Raises StorageError (one line naming `flag`) unless the GCS endpoint answers within 5 s: a gs:// path
  that is only read (an input, a tokenizer) fails fast here, where gcsfs would retry for half a minute."""
  host, port = _endpoint()
  try:
    socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S).close()
  except OSError as e:
    raise StorageError(f"{flag} {path}: cannot reach the GCS endpoint {host}:{port} ({e}). Fix: check the "
                       "network (or STORAGE_EMULATOR_HOST for an emulator), or use a local directory") from None


def _check_gcs(path: epath.Path, flag: str):
  """Connects to the endpoint, then writes and removes one probe object, which needs gcsfs, the bucket and
  credentials allowed to write."""
  check_endpoint(path, flag)
  probe = path / f".loopjax-probe-{uuid.uuid4().hex}"
  try:
    probe.write_text("")
    probe.unlink()
  except ImportError as e:
    raise StorageError(f"{flag} {path}: gs:// needs gcsfs ({e}). Fix: pip install 'loopjax[gcs]'") from None
  except Exception as e:  # noqa: BLE001 - gcsfs/aiohttp/auth errors come as many types
    raise StorageError(f"{flag} {path}: cannot write to the bucket ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:200]}). Fix: check the bucket exists and the credentials "
                       "(gcloud auth application-default login, or the VM's service account) may write it") from None


def check_run_dir(path, flag: str = "--workdir"):
  """Raises StorageError (one line naming `flag` and the fix) unless the run can write under `path`."""
  kind = scheme(os.fspath(path))
  if not kind:
    return
  if kind not in REMOTE_SCHEMES:
    raise StorageError(f"{flag} {path}: the {kind}:// scheme is not supported. Fix: use a local directory "
                       "(or a mount, e.g. gcsfuse) or a gs:// URL")
  _check_gcs(run_path(path), flag)


def append_line(path: epath.Path, line: str):
  """Appends `line` (newline included) to a small log: in place locally, rewritten whole on a bucket."""
  if not is_remote(path):
    with open(path, "a") as f:
      f.write(line)
    return
  before = path.read_text() if path.exists() else ""
  path.write_text(before + line)


class Staged:
  """A local directory mirrored to a run directory on an object store by `sync()`.

  Writers that append (metrics.jsonl, TensorBoard event files) write here as on any disk; `sync()`
  uploads each file that changed, whole, as one object. Locally the staging directory is the run
  directory itself and `sync()` does nothing.
  """

  def __init__(self, target: epath.Path, files: tuple[str, ...] = ()):
    self.target, self.remote = target, is_remote(target)
    self.local = tempfile.mkdtemp(prefix="loopjax-staged-") if self.remote else os.fspath(target)
    os.makedirs(self.local, exist_ok=True)
    self._synced = {}
    for name in files if self.remote else ():
      if (target / name).exists():  # an earlier run's file, to continue
        with open(os.path.join(self.local, name), "wb") as f:
          f.write((target / name).read_bytes())
        self._synced[name] = self._stamp(name)

  def _stamp(self, name: str) -> tuple:
    info = os.stat(os.path.join(self.local, name))
    return info.st_size, info.st_mtime_ns

  def sync(self):
    """Uploads the files that changed since the last sync."""
    if not self.remote:
      return
    for root, _, files in os.walk(self.local):
      for f in files:
        name = os.path.relpath(os.path.join(root, f), self.local)
        if self._synced.get(name) != self._stamp(name):
          (self.target / name).parent.mkdir(parents=True, exist_ok=True)
          with open(os.path.join(self.local, name), "rb") as f:
            (self.target / name).write_bytes(f.read())
          self._synced[name] = self._stamp(name)

  def close(self):
    self.sync()
    if self.remote:
      shutil.rmtree(self.local, ignore_errors=True)


def checkpoints_dir(path) -> epath.Path:
  """A run's workdir or its checkpoints directory -> the checkpoints directory (local or gs://)."""
  path = run_path(path)
  inner = path / "checkpoints"
  return inner if inner.is_dir() else path


def kvstore_url(directory) -> str:
  """The tensorstore kvstore URL of `directory`: file:///abs/ locally, gs://bucket/prefix/ on a bucket
  (tensorstore's gcs driver, which honours TENSORSTORE_GCS_HTTP_URL as Orbax's own writes do)."""
  path = os.fspath(run_path(directory))
  return (path if is_remote(path) else f"file://{path}").rstrip("/") + "/"


COMMIT_FILE = "commit_success.txt"


def is_finished_step(path: epath.Path) -> bool:
  """Whether checkpoint step directory `path` holds a finished save. Locally a finished step is one
  Orbax renamed into place (its name is the step); on a bucket, with no rename, Orbax writes the step
  in place and its commit_success.txt last, so a name alone may be a save in flight or killed."""
  return path.name.isdigit() and (not is_remote(path) or (path / COMMIT_FILE).exists())


def files_under(root: epath.Path, prefix: str = ""):
  """The relative paths ("a/b/c") of every file under `root`, walked with iterdir (epath's walk drops
  the gs:// of the paths it yields)."""
  for path in sorted(root.iterdir()):
    rel = f"{prefix}{path.name}"
    if path.is_dir():
      yield from files_under(path, rel + "/")
    else:
      yield rel


def copy_file(source, target):
  """Streams one file between any two of local disk and a bucket, 16 MiB at a time (a safetensors
  shard is GBs: never whole in memory)."""
  source, target = epath.Path(source), epath.Path(target)
  if not is_remote(target):
    target.parent.mkdir(parents=True, exist_ok=True)
  with source.open("rb") as f, target.open("wb") as g:
    shutil.copyfileobj(f, g, 16 * 2**20)


def copy_tree(source, target, skip=()):
  """Copies every file under `source` to the same relative path under `target` but those in `skip`."""
  source, target = epath.Path(source), epath.Path(target)
  for rel in files_under(source):
    if rel not in skip:
      copy_file(source / rel, target / rel)


def forget_listings(path):
  """Drops epath's cached bucket listings (gcsfs caches them per process): after another process moved
  or removed objects, this one would otherwise go on seeing them."""
  if is_remote(path):
    from etils.epath import backend
    backend.fsspec_backend.fs(os.fspath(path)).invalidate_cache()


def move(source: epath.Path, target: epath.Path):
  """Moves a directory tree: a rename locally; on a bucket, a copy of every object and a delete, through
  epath's own filesystem (whose listing cache Orbax reads: another gcsfs instance would leave it stale)."""
  if not is_remote(source):
    shutil.move(os.fspath(source), os.fspath(target))
    return
  copy_tree(source, target)
  source.rmtree()
