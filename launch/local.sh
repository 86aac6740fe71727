#!/usr/bin/env bash
# A real multi-controller JAX run on one machine: N processes on localhost, each with its own fake
# CPU devices, joined through jax.distributed into one mesh of N x D devices.
#
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS -- loopjax train --config configs/smoke.py --workdir runs/x
#
# Each process gets LOOPJAX_COORDINATOR (127.0.0.1 and a free port), LOOPJAX_NUM_PROCESSES,
# LOOPJAX_PROCESS_ID and LOOPJAX_LOCAL_DEVICES (read by loopjax/distributed.py), and JAX_PLATFORMS=cpu.
# Output: every line on this terminal prefixed "[pI]", and each process's full log in
# $LOOPJAX_LOG_DIR/process_I.log (default: a new temporary directory, printed at the start).
# Exit code: 0 if every process exits 0; else the first failure's code, after stopping the others
# (a process whose peer died would otherwise block in a collective until JAX's heartbeat timeout).
# Ctrl-C / SIGTERM is forwarded to every process as SIGTERM: `loopjax train` saves and exits 75, which
# this script passes on (run the same command again to continue; launch/rerun.sh does that unattended).
set -uo pipefail

usage() { echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- COMMAND [ARGS...]" >&2; exit 2; }
[[ $# -ge 4 && $3 == "--" && $1 =~ ^[1-9][0-9]*$ && $2 =~ ^[1-9][0-9]*$ ]] || usage
num_processes=$1 devices=$2
shift 3

log_dir=${LOOPJAX_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/loopjax-local.XXXXXX")}
mkdir -p "$log_dir"
port=$("${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') \
  || { echo "local.sh: could not find a free port (needs python3 on PATH or \$PYTHON)" >&2; exit 2; }
echo "local.sh: $num_processes processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs in $log_dir" >&2

pids=()  # still running
declare -A index_of  # pid -> process id
for ((i = 0; i < num_processes; i++)); do
  LOOPJAX_COORDINATOR=127.0.0.1:$port LOOPJAX_NUM_PROCESSES=$num_processes LOOPJAX_PROCESS_ID=$i \
    LOOPJAX_LOCAL_DEVICES=$devices JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
    "$@" > >(tee "$log_dir/process_$i.log" | sed -u "s/^/[p$i] /") 2>&1 &
  pids+=("$!")
  index_of[$!]=$i
done

stop_all() {  # SIGTERM to the running processes, then SIGKILL whatever is left after a grace period
  local grace=$1
  ((${#pids[@]})) || return 0
  kill -TERM "${pids[@]}" 2>/dev/null
  for ((t = 0; t < grace * 10; t++)); do
    kill -0 "${pids[@]}" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "${pids[@]}" 2>/dev/null
}
trap 'echo "local.sh: forwarding SIGTERM to all processes" >&2; kill -TERM "${pids[@]}" 2>/dev/null' INT TERM

status=0 remaining=$num_processes
while ((remaining > 0)); do
  wait -n -p finished "${pids[@]}"
  code=$?
  [[ -z ${finished:-} ]] && continue  # interrupted by a trapped signal: keep waiting
  remaining=$((remaining - 1))
  running=()
  for pid in "${pids[@]}"; do [[ $pid != "$finished" ]] && running+=("$pid"); done
  pids=("${running[@]}")
  if ((code != 0 && status == 0)); then
    status=$code
    i=${index_of[$finished]}
    echo "local.sh: process $i (pid $finished) exited with code $code; stopping the others (log: $log_dir/process_$i.log)" >&2
    stop_all 10
  fi
  finished=
done
wait  # the log pipes
exit "$status"
