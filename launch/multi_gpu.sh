#!/usr/bin/env bash
# Every GPU of this machine, one process, MirroredStrategy (one replica per
# GPU; each global batch is split evenly across them).
#
#   launch/multi_gpu.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#   CUDA_VISIBLE_DEVICES=0,1 launch/multi_gpu.sh configs/cifar10_resnet50.py workdirs/c10
#
# The global batch size in the config must divide by the number of GPUs.
exec "$(dirname "$0")/local.sh" "$@" --config.distribution=mirrored
