#!/usr/bin/env bash
# Every GPU of this machine, one process, MirroredStrategy (one replica per
# GPU; each global batch is split evenly across them).
#
#   launch/multi_gpu.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#   CUDA_VISIBLE_DEVICES=0,1 launch/multi_gpu.sh configs/cifar10_resnet50.py workdirs/c10
#
# The global batch size in the config must divide by the number of GPUs.
#
# Exit status: 0 done; 2 a bad config, path or workdir (fix and rerun); 1 the
# run diverged; 143 stopped by SIGTERM (preemption) after writing a backup:
# rerun the same command to resume.
exec "$(dirname "$0")/local.sh" "$@" --config.distribution=mirrored
