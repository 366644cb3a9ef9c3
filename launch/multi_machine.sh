#!/usr/bin/env bash
# Several machines, MultiWorkerMirroredStrategy: run this same command on
# every machine, each with its own INDEX (0 is the chief, which writes the
# run). WORKDIR must be a path on a file system every machine mounts (NFS,
# ...), since all of them resume from the chief's backups; a gs:// (or other
# URL) workdir is refused: the run needs local-file operations (flock,
# rename).
#
#   HOSTS=10.0.0.1:2222,10.0.0.2:2222 INDEX=0 \
#     launch/multi_machine.sh configs/cifar10_resnet50.py /shared/runs/c10
#
# The global batch size in the config is split over all GPUs of all machines
# and must divide by their number. Restarting every machine with the same
# command resumes from the last backup (preemption, a dead worker, ...).
# DRY_RUN=1 prints TF_CONFIG and the command instead of running it.
#
# Exit status: 0 done; 2 a bad config, path or workdir (fix and rerun); 1 the
# run diverged; 143 stopped by SIGTERM (preemption) after writing a backup:
# rerun the same command to resume.
set -euo pipefail
if [ $# -lt 2 ] || [ -z "${HOSTS:-}" ] || [ -z "${INDEX:-}" ]; then
  echo "usage: HOSTS=host:port,host:port INDEX=i $0 CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
workers=$(printf '"%s",' ${HOSTS//,/ })
export TF_CONFIG="{\"cluster\": {\"worker\": [${workers%,}]}, \"task\": {\"type\": \"worker\", \"index\": ${INDEX}}}"
echo "TF_CONFIG=${TF_CONFIG}" >&2
command=(python -m keras_sft.main --config="$config" --workdir="$workdir"
         --config.distribution=multi_worker_mirrored "$@")
if [ -n "${DRY_RUN:-}" ]; then
  echo "${command[@]}"
  exit 0
fi
exec "${command[@]}"
