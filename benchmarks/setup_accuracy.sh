#!/usr/bin/env bash
# Setup for benchmarks/accuracy.py (not a dependency of keras-sft):
#  - the real images: Debian's dataset-fashion-mnist (70,000 Fashion-MNIST
#    images as idx .gz files under /usr/share/datasets/fashion-mnist/);
#  - PyTorch + torchvision for the seed's loop. Only PyPI is reachable from
#    this project's machines, so this is PyPI's default (CUDA) build; it runs
#    on CPU. With download.pytorch.org reachable, TORCH_INDEX_URL=
#    https://download.pytorch.org/whl/cpu gives the much smaller CPU build.
# Usage: bash benchmarks/setup_accuracy.sh [PYTHON]   (default: python3)
set -euo pipefail
PYTHON="${1:-python3}"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist
fi
ls -l /usr/share/datasets/fashion-mnist/
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "$PYTHON" -m pip install torch torchvision --index-url "$TORCH_INDEX_URL"
else
  "$PYTHON" -m pip install "torch==2.14.1" "torchvision==0.29.1"
fi
"$PYTHON" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'threads', torch.get_num_threads())"
