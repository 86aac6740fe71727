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
# First check that the run fits:
#   loopjax compile --config configs/ouro_1p4b.py --topology v5p-128 --config.train.batch_size=64
set -euo pipefail
: "${CLUSTER:?set CLUSTER to your xpk cluster}"
TPU_TYPE=${TPU_TYPE:-v5p-128}
MOUNT=${MOUNT:-/gcs}
WORKLOAD=${WORKLOAD:-loopjax-1p4b-$(date +%m%d-%H%M)}

xpk workload create \
  --cluster "$CLUSTER" \
  --workload "$WORKLOAD" \
  --tpu-type "$TPU_TYPE" \
  --num-slices 1 \
  --base-docker-image python:3.11-slim \
  --script-dir "$(cd "$(dirname "$0")/.." && pwd)" \
  --command "pip install -q -e '.[tpu]' && \
loopjax train --config configs/ouro_1p4b.py --workdir $MOUNT/runs/$WORKLOAD --config.train.batch_size=64"
