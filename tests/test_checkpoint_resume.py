"""Resume after kill -9, SIGTERM/SIGINT and damaged checkpoints: real `loopjax train` subprocesses.

The bar is exact: after any interruption the logged loss at every step equals the uninterrupted run's
bit for bit (tolerance 0: same program, same data, same CPU), and every step is logged once.
"""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest

import _train_subprocess as ts


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 12-step run (checkpoints at 4, 8, 12)."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  code, out = ts.run(workdir)
  assert code == 0, out
  assert [s for s, _ in ts.losses(workdir)] == list(range(1, ts.STEPS + 1))
  return workdir


def assert_same_losses(workdir, reference):
  assert ts.losses(workdir) == ts.losses(reference), ts.output(workdir)


def test_kill9_at_random_step_then_resume_is_bitwise(tmp_path, reference):
  kill_after = random.randint(5, ts.STEPS - 1)  # after step 4's save began
  workdir = str(tmp_path / "run")
  proc = ts.start(workdir)
  ts.wait_until(lambda: len(ts.logged(workdir)) >= kill_after, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  died_at = len(ts.logged(workdir))
  assert died_at < ts.STEPS, f"the run finished before the kill (kill_after={kill_after})"
  # Orbax renames a save to its step number only when it is complete; a save still in flight at the
  # kill (step 8's, when killed at step 9 on a slow machine) stays a tmp directory and must be skipped.
  # The host logs a step one step late and never waits for a save, so on a busy machine even step 4's
  # save may still be in flight at the kill: then the restart begins again from step 0.
  finished = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  code, out = ts.run(workdir)
  assert code == 0, out
  expected = f"resumed from checkpoint step {max(finished)}" if finished else "starting from step 0"
  assert expected in out, (kill_after, died_at, finished, out[-3000:])
  assert_same_losses(workdir, reference)


def test_kill9_during_async_save_then_resume_is_bitwise(tmp_path, reference):
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  unfinished = lambda: glob.glob(os.path.join(ckpt_dir, "*.orbax-checkpoint-tmp*"))
  proc = ts.start(workdir, "--config.checkpoint.every_steps=1")
  # Steps 1, 2, ... each start a save; kill as soon as one of them (after step 3) is still being written.
  ts.wait_until(lambda: len(ts.logged(workdir)) >= 3 and unfinished(), proc, poll=0.0005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  torn = unfinished()
  assert torn, "the save finished before the kill landed"
  code, out = ts.run(workdir, "--config.checkpoint.every_steps=1")
  assert code == 0, out
  assert "was never finished" in out and "resumed from checkpoint step" in out, out[-3000:]
  assert not unfinished()
  assert_same_losses(workdir, reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_exits_75_and_restart_continues(tmp_path, reference, sig):
  """SIGTERM and SIGINT take the same path and exit 75 (EX_TEMPFAIL: run again); the restart is checked
  for SIGTERM only (saves a run)."""
  workdir = str(tmp_path / "run")
  # No periodic saves: the only checkpoint before the end is the one the signal causes.
  proc = ts.start(workdir, "--config.checkpoint.every_steps=0", "--config.checkpoint.every_minutes=0")
  ts.wait_until(lambda: len(ts.logged(workdir)) >= 3, proc)
  proc.send_signal(sig)
  assert proc.wait(timeout=60) == 75, ts.output(workdir)
  out = ts.output(workdir)
  assert f"{sig.name} received" in out
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert len(steps) == 1 and 3 <= steps[0] < ts.STEPS, (steps, out[-2000:])
  assert [s for s, _ in ts.losses(workdir)][-1] == steps[0]  # it stopped right after the saved step
  with open(os.path.join(workdir, "phases.jsonl")) as f:
    events = [json.loads(line) for line in f]
  assert [e["event"] for e in events] == ["start", "preempted"], events  # the session's time is kept
  assert events[1]["step"] == steps[0] and events[1]["wall_seconds"] > 0, events
  if sig != signal.SIGTERM:
    return
  code, out = ts.run(workdir, "--config.checkpoint.every_steps=0", "--config.checkpoint.every_minutes=0")
  assert code == 0, out
  assert f"resumed from checkpoint step {steps[0]}" in out
  assert_same_losses(workdir, reference)


def _truncate_largest_array_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "params", "**", "*"), recursive=True) if os.path.isfile(f)]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)


def _swap_in_older_params(step_dir, older_dir):
  """Readable, well-formed files holding the wrong values: only the checksum can tell."""
  shutil.rmtree(os.path.join(step_dir, "params"))
  shutil.copytree(os.path.join(older_dir, "params"), os.path.join(step_dir, "params"))


def _restart_and_check(workdir, reference, damaged, resumed_from):
  # The copied run has ended; asking for the same 12 steps again redoes the steps after `resumed_from`.
  code, out = ts.run(workdir)
  assert code == 0, out
  for step in damaged:
    assert f"checkpoint step {step} in" in out and "is damaged" in out, out[-3000:]
  assert f"resumed from checkpoint step {resumed_from}" in out
  assert sorted(d.split("-")[0] for d in os.listdir(os.path.join(workdir, "checkpoints-corrupt"))) == \
      sorted(str(s) for s in damaged)
  assert_same_losses(workdir, reference)
  return out


def test_truncated_and_unreadable_checkpoints_fall_back(tmp_path, reference):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  ckpt = os.path.join(workdir, "checkpoints")
  _truncate_largest_array_file(os.path.join(ckpt, "12"))
  os.remove(os.path.join(ckpt, "8", "opt_state", "_METADATA"))
  _restart_and_check(workdir, reference, damaged=[12, 8], resumed_from=4)
  listing = subprocess.run([ts.LOOPJAX, "checkpoints", workdir], capture_output=True, text=True, check=True)
  rows = [line.split() for line in listing.stdout.splitlines()[1:]]
  assert [(r[0], r[1], r[3]) for r in rows] == [("4", "main", "yes"), ("8", "main", "yes"), ("12", "main", "yes")]


def test_the_only_checkpoint_truncated_stops_in_one_line_and_trains_nothing(tmp_path, reference):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  ckpt = os.path.join(workdir, "checkpoints")
  for step in ("4", "8"):
    shutil.rmtree(os.path.join(ckpt, step))
  _truncate_largest_array_file(os.path.join(ckpt, "12"))
  before = ts.logged(workdir)
  code, out = ts.run(workdir, "--config.train.steps=16", "--config.optim.on_schedule_change=reschedule",
                     env=ts.WITHOUT_TPU)
  assert code == 3, out
  fault = [line for line in out.splitlines() if not line.startswith("loopjax: ")]
  assert len(fault) == 1 and fault[0].startswith("loopjax train: no checkpoint in") and "step 12: " in fault[0], out
  assert "allow_fresh_start=True" in fault[0] and "Traceback" not in out
  assert sorted(os.listdir(ckpt)) == ["12"] and not os.path.exists(ckpt + "-corrupt")
  assert ts.logged(workdir) == before


@pytest.fixture
def small_disk(tmp_path):
  """A 3 MiB tmpfs: room for two checkpoints of the smoke model, not three. Needs mount rights."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
  yield str(mount)
  subprocess.run(["umount", "-l", str(mount)], check=True)


def test_disk_full_at_a_save_ends_in_one_line_and_the_next_run_resumes(small_disk, reference):
  workdir = os.path.join(small_disk, "run")
  code, out = ts.run(workdir, env=ts.WITHOUT_TPU)
  fault = [line for line in out.splitlines() if not line.startswith("loopjax: ")]
  assert code == 3 and 1 <= len(fault) <= 3 and "Traceback" not in out, out
  unfinished = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if not d.isdigit()]
  assert len(unfinished) == 1, unfinished
  step = unfinished[0].split(".")[0]
  assert f"saving the checkpoint of step {step} to" in fault[-1] and "No space left on device" in fault[-1], out
  assert "Fix: free space on that disk" in fault[-1]
  subprocess.run(["mount", "-o", "remount,size=64m", small_disk], check=True)
  code, out = ts.run(workdir, env=ts.WITHOUT_TPU)
  assert code == 0, out
  assert f"{step}.orbax-checkpoint-tmp" in out and "was never finished" in out
  assert_same_losses(workdir, reference)


def test_checksum_catches_wrong_but_readable_values(tmp_path, reference):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  ckpt = os.path.join(workdir, "checkpoints")
  _swap_in_older_params(os.path.join(ckpt, "12"), os.path.join(ckpt, "8"))
  out = _restart_and_check(workdir, reference, damaged=[12], resumed_from=8)
  assert "fails its checksum" in out


def test_checkpoints_command_marks_unfinished_saves(tmp_path, reference):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  ckpt = os.path.join(workdir, "checkpoints")
  os.rename(os.path.join(ckpt, "12"), os.path.join(ckpt, "12.orbax-checkpoint-tmp-1234"))
  listing = subprocess.run([ts.LOOPJAX, "checkpoints", workdir], capture_output=True, text=True, check=True)
  last = listing.stdout.splitlines()[-1].split()
  assert last[:2] == ["12", "?"] and last[3] == "NO" and "unfinished" in listing.stdout, listing.stdout


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-v"]))
