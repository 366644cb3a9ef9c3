#!/usr/bin/env bash
# A Cloud TPU VM: TPUStrategy over the local TPU chips (TPU_NAME=local), or a
# named TPU with TPU_NAME=<name>. Install the TPU build of TensorFlow first,
# as Google documents for TPU VMs.
#
#   launch/tpu_vm.sh configs/cifar10_resnet50.py /tmp/runs/c10
#   gsutil -m cp -r /tmp/runs/c10/export gs://bucket/runs/c10/
#
# The workdir must be on the VM's own file system (its boot disk or a mounted
# persistent disk): its lock, atomic backups and exports need local-file
# operations (flock, rename), so a gs:// workdir is refused with an error.
# Copy the export (or the whole run) to a bucket after the run, as above.
#
# Exit status: 0 done; 2 a bad config, path or workdir (fix and rerun); 1 the
# run diverged; 143 stopped by SIGTERM (preemption) after writing a backup:
# rerun the same command to resume.
export TPU_NAME=${TPU_NAME:-local}
exec "$(dirname "$0")/local.sh" "$@" --config.distribution=tpu
