"""The launch scripts: they parse, and the restart on exit code 75 (`launch/rerun.sh`, which
`launch/tpu_pod.sh run` puts around the command on every worker) runs for real with stand-in commands.

`tpu_pod.sh` is run end to end with a stand-in `gcloud` that runs the remote command here (one
worker, HOME in a temporary directory), so its quoting, pid file, log and `stop` are the real ones.
"""

import contextlib
import os
import signal
import subprocess
import time

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LAUNCH = os.path.join(REPO, "launch")
RERUN = os.path.join(LAUNCH, "rerun.sh")
# Counts its runs in the file $RUNS and exits $CODE (default 75) until run $UNTIL, then $LAST ($CODE each
# time without UNTIL).
COUNTING = ('n=$(( $(cat "$RUNS" 2>/dev/null || echo 0) + 1 )); echo $n > "$RUNS"; '
            '[ $n -ge "${UNTIL:-0}" ] && [ "${UNTIL:-0}" -gt 0 ] && exit "$LAST"; exit "${CODE:-75}"')


def runs(tmp_path) -> int:
  return int((tmp_path / "runs").read_text())


def rerun(tmp_path, *flags: str, until: int = 0, last: int = 0, code: int = 75) -> subprocess.CompletedProcess:
  env = dict(os.environ, RUNS=str(tmp_path / "runs"), UNTIL=str(until), LAST=str(last), CODE=str(code),
             LOOPJAX_RERUN_DELAY="0")
  return subprocess.run(["bash", RERUN, *flags, "--", "bash", "-c", COUNTING], env=env, capture_output=True,
                        text=True, timeout=60)


@pytest.mark.parametrize("script", sorted(os.listdir(LAUNCH)))
def test_every_launch_script_parses(script):
  result = subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def test_reruns_while_the_command_exits_75_then_passes_its_code_on(tmp_path):
  result = rerun(tmp_path, until=3, last=0)
  assert (result.returncode, runs(tmp_path)) == (0, 3), result.stderr
  assert "restart 1 of at most 100" in result.stderr and "restart 2 of at most 100" in result.stderr


def test_a_hung_run_exit_76_is_run_again_too(tmp_path):
  result = rerun(tmp_path, until=3, last=0, code=76)
  assert (result.returncode, runs(tmp_path)) == (0, 3), result.stderr
  assert "exit 76 (hung: the watchdog stopped it): restart 2 of at most 100" in result.stderr


@pytest.mark.parametrize("code", [1, 2, 3, 137])
def test_any_other_code_ends_it_at_once(tmp_path, code):
  result = rerun(tmp_path, until=1, last=code)
  assert (result.returncode, runs(tmp_path)) == (code, 1)
  assert "restart" not in result.stderr


def test_max_restarts_bounds_the_reruns(tmp_path):
  result = rerun(tmp_path, "--max-restarts", "2")
  assert (result.returncode, runs(tmp_path)) == (75, 3)
  assert "exit 75 again after 2 restarts (--max-restarts 2): giving up" in result.stderr


@pytest.mark.parametrize("argv", [["--max-restarts", "x", "--", "true"], ["--delay", "--", "true"],
                                  ["--bogus", "1", "--", "true"], ["true"], ["--"]])
def test_bad_usage_exits_2(argv):
  result = subprocess.run(["bash", RERUN, *argv], capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and "usage:" in result.stderr


def wait_for(path, timeout: float = 30.0):
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.05)


@contextlib.contextmanager
def started(argv, env):
  """Popen in its own process group, killed with everything it started if the test fails."""
  proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  try:
    yield proc
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


# Like a preempted `loopjax train`: on SIGTERM it "saves" (writes `saved`) and exits 75.
SAVES_ON_TERM = ('echo started >> "$STARTS"; trap \'echo saved >> "$SAVED"; exit 75\' TERM; '
                 'while true; do sleep 0.05; done')


def test_sigterm_is_passed_on_and_ends_the_reruns(tmp_path):
  env = dict(os.environ, STARTS=str(tmp_path / "starts"), SAVED=str(tmp_path / "saved"), LOOPJAX_RERUN_DELAY="0")
  with started(["bash", RERUN, "--", "bash", "-c", SAVES_ON_TERM], env) as proc:
    wait_for(tmp_path / "starts")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
  assert proc.returncode == 75, output
  assert (tmp_path / "starts").read_text() == "started\n"  # not run again
  assert (tmp_path / "saved").read_text() == "saved\n"


@pytest.fixture
def fake_gcloud(tmp_path):
  """PATH with a `gcloud` whose `tpu-vm ssh ... --command CMD` runs CMD here, and HOME in tmp_path."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text('#!/usr/bin/env bash\n'
                    'while [[ $# -gt 0 && $1 != --command ]]; do shift; done\n'
                    'exec bash -c "$2"\n')
  gcloud.chmod(0o755)
  home = tmp_path / "home"
  home.mkdir()
  return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HOME=str(home), LOOPJAX_RUN="t")


def tpu_pod(action: str, *args: str) -> list[str]:
  return [os.path.join(LAUNCH, "tpu_pod.sh"), action, "my-tpu", "us-east5-a", *args]


def test_tpu_pod_run_restarts_on_75_with_its_env_and_log(tmp_path, fake_gcloud):
  argv = tpu_pod("run", "--repo", REPO, "--max-restarts", "5", "--env", "LOOPJAX_RERUN_DELAY=0",
                 "--env", f"RUNS={tmp_path / 'runs'}", "--env", "UNTIL=3", "--env", "LAST=0",
                 "--", "bash", "-c", COUNTING + " # a 'quoted' \"comment\" $HOME survives the two shells")
  result = subprocess.run(argv, env=fake_gcloud, capture_output=True, text=True, timeout=120)
  assert (result.returncode, runs(tmp_path)) == (0, 3), result.stdout + result.stderr
  log = (tmp_path / "home" / "loopjax-logs" / f"t.{os.uname().nodename}.log").read_text()
  assert "restart 2 of at most 5" in log


def test_tpu_pod_stop_saves_and_does_not_rerun(tmp_path, fake_gcloud):
  argv = tpu_pod("run", "--repo", REPO, "--env", "LOOPJAX_RERUN_DELAY=0", "--env", f"STARTS={tmp_path / 'starts'}",
                 "--env", f"SAVED={tmp_path / 'saved'}", "--", "bash", "-c", SAVES_ON_TERM)
  with started(argv, fake_gcloud) as proc:
    wait_for(tmp_path / "starts")
    subprocess.run(tpu_pod("stop"), env=fake_gcloud, check=True, timeout=60)
    output, _ = proc.communicate(timeout=60)
  assert proc.returncode == 75, output
  assert (tmp_path / "starts").read_text() == "started\n"
  assert (tmp_path / "saved").read_text() == "saved\n"


def test_tpu_pod_rejects_a_bad_max_restarts(fake_gcloud):
  result = subprocess.run(tpu_pod("run", "--max-restarts", "many", "--", "true"), env=fake_gcloud,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and "--max-restarts takes a count, got 'many'" in result.stderr


def stand_ins(tmp_path, **scripts: str) -> dict:
  """The environment with PATH starting at a directory of executable stand-ins (name -> bash body); each
  also records its arguments, one call per line, in tmp_path/<name>.calls."""
  bin_dir = tmp_path / "stand-ins"
  bin_dir.mkdir(exist_ok=True)
  for name, body in scripts.items():
    path = bin_dir / name
    path.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{tmp_path / name}.calls"\n{body}\n')
    path.chmod(0o755)
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True, exist_ok=True)
  (venv / "bin" / "activate").write_text("")
  return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", LOOPJAX_VENV=str(venv),
              SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="n1")


@pytest.mark.parametrize("code,requeued", [(75, True), (76, True), (3, False), (0, False)])
def test_slurm_script_requeues_on_75_and_76_only(tmp_path, code, requeued):
  env = stand_ins(tmp_path, srun=f"exit {code}", scontrol="exit 0")
  result = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch"), "--config", "c.py"], env=env,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == code, result.stdout + result.stderr
  assert "loopjax train --config c.py" in (tmp_path / "srun.calls").read_text()
  assert (tmp_path / "scontrol.calls").exists() == requeued
  if requeued:
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 7\n"


def test_xpk_workload_restarts_on_75_and_76(tmp_path):
  env = dict(stand_ins(tmp_path, xpk="exit 0"), CLUSTER="c")
  subprocess.run(["bash", os.path.join(LAUNCH, "xpk_example.sh")], env=env, check=True, timeout=60)
  argv = (tmp_path / "xpk.calls").read_text()
  assert "--restart-on-exit-codes 75,76 " in argv and "--max-restarts 100 " in argv
