"""The checkpoint keys: when to save, what to keep, how to resume, and the workdir lease.

Defaults and start-up checks, beside `config.py` (as `config_longrun.py` is for the long-run train keys):
`default_config()` adds these to its `checkpoint` section and `validate()` runs `check`, so a bad value
fails at start-up in one line naming the field and the fix.
"""


def add_defaults(k):
  """Adds this module's keys to the config's `checkpoint` section `k`."""
  # Checkpoints live in WORKDIR/checkpoints; `loopjax train` resumes from the newest complete one.
  k.every_steps = 1000  # save every N steps (0 = never by step count); the last step is always saved
  k.every_minutes = 30.0  # also save when this many minutes have passed since the last save (0 = off)
  k.keep = 3  # keep the latest K checkpoints...
  k.keep_period = 0  # ...plus every step divisible by P, permanently (0 = none)
  k.async_save = True  # write in a background thread while training continues
  k.compress = False  # zstd on the arrays: 8-20% fewer bytes for CPU the step competes with
  k.phase = "main"  # recorded in every checkpoint (the phase runner sets it)
  # Resuming (loopjax/checkpoint/recovery.py): a checkpoint is set aside only on proof of damage; a storage
  # error that may pass is retried this many times, waiting retry_seconds, then twice that, ...; when
  # checkpoints exist and none restores, the run refuses to start over from step 0 unless this is True.
  k.restore_retries = 5
  k.restore_retry_seconds = 2.0
  k.allow_fresh_start = False
  # One writer per workdir (loopjax/lease.py): a run holds WORKDIR/lease.json and rewrites its heartbeat
  # this often; a lease whose heartbeat is older than the timeout (or whose process on this host is gone)
  # is taken over by the next run. Keep the timeout well above the heartbeat and any clock skew.
  k.lease_heartbeat_seconds = 30.0
  k.lease_timeout_minutes = 10.0


def check(k, fail):
  """Fails (via `fail(field, problem, fix)`) on a checkpoint setting that cannot work."""
  for field in ("every_steps", "every_minutes", "keep_period"):
    if k[field] < 0:
      fail(f"checkpoint.{field}", f"must be >= 0, got {k[field]}", f"set --config.checkpoint.{field} to 0 (off) or more")
  if k.keep < 1:
    fail("checkpoint.keep", f"must be >= 1, got {k.keep}", "keep at least the latest checkpoint (resume needs it)")
  if k.restore_retries < 0 or k.restore_retry_seconds < 0:
    fail("checkpoint.restore_retries", f"restore_retries={k.restore_retries} and restore_retry_seconds="
         f"{k.restore_retry_seconds} must be >= 0", "use 0 to fail at the first storage error, or a positive count")
  if not k.phase or "/" in k.phase:
    fail("checkpoint.phase", f"{k.phase!r} is not a usable name", "use a short name such as 'main'")
  for field in ("lease_heartbeat_seconds", "lease_timeout_minutes"):
    if k[field] <= 0:
      fail(f"checkpoint.{field}", f"must be > 0, got {k[field]}", f"set --config.checkpoint.{field} to a positive number")
  if k.lease_heartbeat_seconds >= k.lease_timeout_minutes * 60:
    fail("checkpoint.lease_heartbeat_seconds", f"{k.lease_heartbeat_seconds:g} s is not shorter than "
         f"checkpoint.lease_timeout_minutes={k.lease_timeout_minutes:g}, so a live run would look stale",
         "make the heartbeat a small fraction of the timeout (defaults: 30 s and 10 min)")
