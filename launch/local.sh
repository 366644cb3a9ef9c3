#!/usr/bin/env bash
# One process on this machine (CPU, or the first GPU TensorFlow sees).
#
#   launch/local.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#   launch/local.sh configs/cifar10_resnet50.py workdirs/cifar10
#
# Process and environment only: hyperparameters live in the config file.
#
# Exit status: 0 done; 2 a bad config, path or workdir (fix and rerun); 1 the
# run diverged; 143 stopped by SIGTERM (preemption) after writing a backup:
# rerun the same command to resume.
set -euo pipefail
if [ $# -lt 2 ] || [[ $1 == --* ]] || [[ $2 == --* ]]; then
  echo "usage: $(basename "$0") CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
exec python -m keras_sft.main --config="$config" --workdir="$workdir" "$@"
