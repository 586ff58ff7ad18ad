#!/usr/bin/env bash
# Install unime_jax on every worker of a TPU VM slice.
#   tpu_scripts/setup.sh TPU_NAME ZONE [PROJECT]
# Copies this checkout to ~/unime_jax on each worker and builds a venv with jax[tpu].
set -euo pipefail
TPU_NAME=${1:?usage: setup.sh TPU_NAME ZONE [PROJECT]}
ZONE=${2:?usage: setup.sh TPU_NAME ZONE [PROJECT]}
PROJECT_FLAG=${3:+--project=$3}
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)

tar -C "$REPO_DIR" --exclude=.venv --exclude=.git --exclude=runs -czf /tmp/unime_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/unime_jax.tgz "$TPU_NAME":/tmp/unime_jax.tgz \
  --zone="$ZONE" $PROJECT_FLAG --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command='
  set -e
  mkdir -p ~/unime_jax && tar -C ~/unime_jax -xzf /tmp/unime_jax.tgz
  cd ~/unime_jax
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt "jax[tpu]==0.10.2"
  .venv/bin/pip install -q --no-deps -e .
  .venv/bin/python -c "import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())"
'
