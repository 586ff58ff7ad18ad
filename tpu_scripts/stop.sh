#!/usr/bin/env bash
# Preempt-style stop: SIGTERM on every worker; each saves a checkpoint and exits cleanly.
#   tpu_scripts/stop.sh TPU_NAME ZONE
set -euo pipefail
gcloud compute tpus tpu-vm ssh "${1:?usage: stop.sh TPU_NAME ZONE}" --zone="${2:?}" --worker=all \
  --command='pkill -TERM -f "unime_jax.main" || true'
