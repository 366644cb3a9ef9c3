#!/usr/bin/env bash
# ResNet50 training throughput on GPUs at 224px, bf16: one GPU without and
# with XLA, then every GPU under MirroredStrategy; then the train step and
# the export of one backbone per family, as ratios to ResNet50 (README
# "Backbones"). Writes benchmarks/gpu-*.json and prints a table per run.
#
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--image_size=224 --batch_size=128 --precision=mixed_bfloat16
        --steps=10 --repeats=5 --pipeline_steps=50 --num_examples=512)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
python benchmarks/run.py "${common[@]}" --jit_compile=false \
  --out=benchmarks/gpu-1gpu.json
python benchmarks/run.py "${common[@]}" --jit_compile=true \
  --out=benchmarks/gpu-1gpu-xla.json
python benchmarks/run.py "${common[@]}" --distribution=mirrored \
  --out=benchmarks/gpu-mirrored.json
python benchmarks/run.py "${common[@]}" --jit_compile=false \
  --model=resnet50,resnet50v2,efficientnetv2_b0,convnext_tiny,mobilenetv3_large \
  --out=benchmarks/gpu-backbones.json
