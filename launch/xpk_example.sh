#!/usr/bin/env bash
# An xpk (GKE) workload: loopjax on every host of a TPU slice, as one JobSet.
#
#   CLUSTER=my-cluster BUCKET=my-bucket launch/xpk_example.sh
#
# xpk builds an image from a base image plus this repository (--script-dir), and runs the command on
# every host of the slice. JAX detects the GKE TPU environment (TPU_WORKER_HOSTNAMES) by itself, so
# the command needs no coordinator flags. WORKDIR must be storage every host sees: a Cloud Storage
# bucket attached to the cluster through the GCS FUSE CSI driver (`xpk storage attach`) and mounted
# at $MOUNT in the workload's pods (checkpoints come from all hosts, metrics.jsonl from host 0).
# Restarts: when `loopjax train` exits 75 (preempted with the checkpoint saved, or storage briefly
# unavailable) or 76 (hung: its watchdog stopped it) the whole JobSet is recreated and resumes from the
# checkpoint, at most MAX_RESTARTS times (default 100): xpk's --restart-on-exit-codes=75,76 leaves them
# out of the pod failure policy's FailJob rule (onExitCodes operator NotIn), so the failed Job takes the
# JobSet's RestartJobSet action,
# counted against failurePolicy.maxRestarts (--max-restarts). xpk always adds 42 and 127-255 (a process
# killed by a signal, e.g. SIGKILL when a save outlasts the grace period) to that list; any other code
# (1 a crash, 2 bad input, 3 a fault that needs a person) fails the JobSet at once. On eviction or
# preemption the pods get SIGTERM and GRACE_SECONDS (default 120) to save before SIGKILL; `exec` makes
# loopjax the process xpk's wrapper passes SIGTERM to.
# First check that the run fits:
#   loopjax compile --config configs/ouro_1p4b.py --topology v5p-128 --config.train.batch_size=64
set -euo pipefail
: "${CLUSTER:?set CLUSTER to your xpk cluster}"
TPU_TYPE=${TPU_TYPE:-v5p-128}
MOUNT=${MOUNT:-/gcs}
WORKLOAD=${WORKLOAD:-loopjax-1p4b-$(date +%m%d-%H%M)}
MAX_RESTARTS=${MAX_RESTARTS:-100}
GRACE_SECONDS=${GRACE_SECONDS:-120}

xpk workload create \
  --cluster "$CLUSTER" \
  --workload "$WORKLOAD" \
  --tpu-type "$TPU_TYPE" \
  --num-slices 1 \
  --base-docker-image python:3.11-slim \
  --script-dir "$(cd "$(dirname "$0")/.." && pwd)" \
  --max-restarts "$MAX_RESTARTS" \
  --restart-on-exit-codes 75,76 \
  --termination-grace-period-seconds "$GRACE_SECONDS" \
  --command "pip install -q -e '.[tpu]' && \
exec loopjax train --config configs/ouro_1p4b.py --workdir $MOUNT/runs/$WORKLOAD --config.train.batch_size=64"
