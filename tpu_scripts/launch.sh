#!/usr/bin/env bash
# Run a training config on every worker of a TPU VM slice (all hosts run the same command;
# unime_jax.main calls jax.distributed.initialize() on multi-host TPU).
#   tpu_scripts/launch.sh [--skip-aot-check] TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
# Example:
#   tpu_scripts/launch.sh my-v5e-32 us-west4-a configs/stage2.py /mnt/shared/runs/s2 \
#     --config.model=/mnt/ckpt/llava-onevision-qwen2-7b-ov-hf --config.data_dir=/mnt/data/tfds
# First the step is compiled for the slice's own accelerator type (python -m unime_jax.aot on
# worker 0, no TPU claimed): a step that does not fit the slice's HBM is not launched
# (--skip-aot-check launches anyway). Model and data paths must exist on every worker (a shared
# disk or a copy per host; the data is the TFDS data dir prepared by `python -m
# unime_jax.datasets build mmeb_train ...`). WORKDIR must be one directory that all hosts see (Filestore/NFS, or a
# bucket mounted with gcsfuse): orbax writes each host's shards of a checkpoint there; process 0
# writes metrics and results. Logs of each worker go to ~/unime_jax/train.log there; rerun the
# same command to resume.
set -euo pipefail
CHECK=1
if [[ "${1:-}" == "--skip-aot-check" ]]; then
  CHECK=0
  shift
fi
TPU_NAME=${1:?usage: launch.sh [--skip-aot-check] TPU_NAME ZONE CONFIG WORKDIR [overrides...]}
ZONE=${2:?}
CONFIG=${3:?}
WORKDIR=${4:?}
shift 4
OVERRIDES="$*"
if [[ $CHECK == 1 ]]; then
  ACCELERATOR=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
    --format='value(acceleratorType)')
  echo "checking that the step fits $ACCELERATOR before launching ..."
  if ! gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=0 --command="
      cd ~/unime_jax && .venv/bin/python -m unime_jax.aot --config=$CONFIG \
        --topology=$ACCELERATOR $OVERRIDES"; then
    echo "error: the step of $CONFIG does not fit (or does not compile for) $ACCELERATOR; not launched" >&2
    echo "Fix: follow the check's advice above, or pass --skip-aot-check to launch anyway" >&2
    exit 1
  fi
fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd ~/unime_jax && nohup .venv/bin/python -m unime_jax.main --config=$CONFIG --workdir=$WORKDIR \
    $OVERRIDES > train.log 2>&1 &
  echo started on \$(hostname)
"
