#!/usr/bin/env bash
# The same command on every worker of a Cloud TPU VM pod slice, through
# `gcloud compute tpus tpu-vm ssh --worker=all`. JAX finds the pod by itself (TPU metadata), so no
# coordinator flags are needed: loopjax/distributed.py detects the pod and joins all workers.
#
#   launch/tpu_pod.sh run  NAME ZONE [--project P] [--repo DIR] [--env K=V]... [--max-restarts N] -- loopjax train ARGS...
#   launch/tpu_pod.sh stop NAME ZONE [--project P]            # SIGTERM: every worker saves and exits, no rerun
#   launch/tpu_pod.sh logs NAME ZONE [--project P] [--dest DIR]  # copy every worker's log here
#
# run: on each worker, cd to --repo (default ~/loopjax, a clone with `pip install -e ".[tpu]"` done;
# its .venv is activated if there is one), export the --env variables, and run the command under that
# clone's launch/rerun.sh with output to ~/loopjax-logs/<run>.<worker host>.log
# (and to this terminal; gcloud interleaves the workers, each loopjax log line names its process).
# Restarts: when the command exits 75 (preempted with the checkpoint saved, or storage briefly
# unavailable) or 76 (hung: its watchdog stopped it) it is run again on that worker, at most --max-restarts times (default 100); any other
# code ends the run. Each worker decides from its own process's code, and `loopjax train` exits 75 on
# every process together (they all save the same step), so all workers run again or none does; a
# worker that ran again alone would stop in jax.distributed start-up, waiting for its peers.
# The run's pid goes to ~/loopjax-logs/<run>.pid so `stop` signals exactly that process: it passes
# SIGTERM on to loopjax, which saves and exits 75, and does not run it again.
# WORKDIR must be storage every worker sees: a gs://BUCKET/RUN URL (written natively; needs the
# `gcs` extra and the VMs' service account allowed to write the bucket), or Filestore / a gcsfuse
# mount. Checkpoints are written by all workers together and metrics by worker 0.
set -euo pipefail

usage() { sed -n '5,7p' "$0" | sed 's/^# *//' >&2; exit 2; }
[[ $# -ge 3 ]] || usage
action=$1 name=$2 zone=$3
shift 3
project=() repo='~/loopjax' envs=() dest=./tpu-logs run=${LOOPJAX_RUN:-loopjax} max_restarts=100
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --project) project=(--project "$2"); shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    --env) [[ $2 == *=* ]] || { echo "tpu_pod.sh: --env takes K=V, got '$2'" >&2; exit 2; }; envs+=("$2"); shift 2 ;;
    --dest) dest=$2; shift 2 ;;
    --max-restarts) [[ $2 =~ ^[0-9]+$ ]] || { echo "tpu_pod.sh: --max-restarts takes a count, got '$2'" >&2; exit 2; }
      max_restarts=$2; shift 2 ;;
    *) echo "tpu_pod.sh: unknown option '$1'" >&2; usage ;;
  esac
done
[[ ${1:-} == "--" ]] && shift

on_all_workers() { gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project[@]}" --worker=all --command "$1"; }
logs=\~/loopjax-logs

case $action in
  run)
    [[ $# -gt 0 ]] || { echo "tpu_pod.sh run: give the command after --" >&2; exit 2; }
    exports=""
    for kv in "${envs[@]}"; do exports+="export $(printf '%q' "$kv"); "; done
    command=$(printf '%q ' "$@")
    remote="mkdir -p $logs && cd $repo && { [ ! -f .venv/bin/activate ] || . .venv/bin/activate; } && "
    remote+="${exports}echo \$\$ > $logs/$run.pid && "
    remote+="exec > >(tee -a $logs/$run.\$(hostname).log) 2>&1 && exec bash launch/rerun.sh --max-restarts $max_restarts -- $command"
    on_all_workers "bash -c $(printf '%q' "$remote")"
    ;;
  stop)
    on_all_workers "test -f $logs/$run.pid && kill -TERM \$(cat $logs/$run.pid) || echo 'no run on' \$(hostname)"
    ;;
  logs)
    mkdir -p "$dest"
    gcloud compute tpus tpu-vm scp "$name:$logs/$run.*.log" "$dest/" --zone "$zone" "${project[@]}" --worker=all
    ls -l "$dest"
    ;;
  *) usage ;;
esac
