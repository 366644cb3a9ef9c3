"""The network and what trains it.

- `backbones`: the table of keras.applications backbones (one entry per
  family), their preprocessing and weights files.
- `network`: backbone + head, BatchNorm policy, frozen stages.
- `classifier`: the `keras.Model` whose `train_step` adds λ·R(θ).
- `losses`: cross-entropy on ids or soft labels.
- `batch_norm`, `depthwise`: fused TensorFlow kernels for Keras layers.
- `precise_bn`: BatchNorm statistics re-estimated for given weights.
"""
