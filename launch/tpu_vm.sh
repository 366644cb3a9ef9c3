#!/usr/bin/env bash
# A Cloud TPU VM: TPUStrategy over the local TPU chips (TPU_NAME=local), or a
# named TPU with TPU_NAME=<name>. Install the TPU build of TensorFlow first
# (`pip install tensorflow-tpu -f <libtpu releases>` as Google documents).
#
#   launch/tpu_vm.sh configs/cifar10_resnet50.py gs://bucket/runs/c10
#
# TPUs read and write through GCS: put data_dir and the workdir in a bucket.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
export TPU_NAME=${TPU_NAME:-local}
exec python -m keras_sft.main --config="$config" --workdir="$workdir" \
  --config.distribution=tpu "$@"
