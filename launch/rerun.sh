#!/usr/bin/env bash
# Runs a command, and runs it again while it exits 75 or 76: `loopjax train` exits 75 (EX_TEMPFAIL) when
# it was preempted with its checkpoint saved, or its storage was briefly unavailable, and 76 when its
# watchdog found its steps hung (a stuck collective or host); running the same command again continues
# the run from its newest checkpoint. Any other code ends it with that code (0 finished, 1 a crash,
# 2 bad input, 3 a fault that needs a person). launch/tpu_pod.sh runs the command under it on every worker.
#
#   launch/rerun.sh [--max-restarts N] [--delay SECONDS] -- COMMAND [ARGS...]
#
# --max-restarts: at most N runs after the first (default 100); --delay: seconds before each (default
# $LOOPJAX_RERUN_DELAY, else 10).
# SIGTERM or SIGINT is passed on to the command as SIGTERM and ends the reruns: the run saves, exits
# 75 and is not started again (`launch/tpu_pod.sh stop`). Exit code: the command's last.
set -uo pipefail

usage() { echo "usage: $0 [--max-restarts N] [--delay SECONDS] -- COMMAND [ARGS...]" >&2; exit 2; }
max_restarts=100 delay=${LOOPJAX_RERUN_DELAY:-10}
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --max-restarts) [[ ${2:-} =~ ^[0-9]+$ ]] || usage; max_restarts=$2; shift 2 ;;
    --delay) [[ ${2:-} =~ ^[0-9]+$ ]] || usage; delay=$2; shift 2 ;;
    *) usage ;;
  esac
done
[[ ${1:-} == "--" && $# -ge 2 && $delay =~ ^[0-9]+$ ]] || usage
shift

child="" stopping=0
# The command runs in the background so that a signal reaches this trap at once (a trap waits for a
# foreground command to finish); `wait` returns early when it fires, so wait again until it is gone.
trap 'stopping=1; [[ -n $child ]] && kill -TERM "$child" 2>/dev/null' TERM INT

restarts=0
while true; do
  "$@" &
  child=$!
  while kill -0 "$child" 2>/dev/null; do wait "$child"; done
  wait "$child"  # its exit status (bash keeps it after the child is gone)
  code=$?
  child=""
  (((code == 75 || code == 76) && stopping == 0)) || exit "$code"
  if ((restarts >= max_restarts)); then
    echo "rerun.sh: exit $code again after $restarts restarts (--max-restarts $max_restarts): giving up" >&2
    exit "$code"
  fi
  restarts=$((restarts + 1))
  why="preempted with the checkpoint saved, or storage unavailable"
  ((code == 76)) && why="hung: the watchdog stopped it"
  echo "rerun.sh: exit $code ($why): restart $restarts of at most $max_restarts in ${delay} s" >&2
  sleep "$delay" &
  wait $!  # interruptible by the trap
  ((stopping == 0)) || exit "$code"
done
