"""The from-scratch search space (`--config.weights=None`): the learning
rate, the L2 term, the augmentation and label smoothing.

    python -m keras_sft.tune --config=configs/default.py \
        --workdir=/tmp/study --space=configs/spaces/from_scratch.py \
        --trials=12 --config.weights=None --config.dataset=folder:DIR

For networks trained from random initialization, e.g. the from-scratch rows
of benchmarks/tune.py. It leaves out what configs/spaces/finetune.py adds
for pretrained weights: `freeze_until`, `batch_norm='frozen'`,
`head_only_epochs` and the backbone LR multiplier mean nothing (or train a
network with frozen random layers, or no normalization) without them.

Keys are those of configs/default.py. `{'low', 'high', 'log'}` is a range
(integers for an int key), `{'choices': [...]}` a list of values.
"""


def get_space():
  """Returns {config key: range}."""
  return {
      # Peak learning rate per 256 images (scaled with the batch size); from
      # scratch tolerates (and often wants) more than fine-tuning: 0.03 beat
      # the default 0.01 by 2.2 points on Fashion-MNIST without augmentation
      # (benchmarks/ACCURACY.md).
      'learning_rate': {'low': 1e-3, 'high': 0.3, 'log': True},
      # λ of the L2 term.
      'weight_decay': {'low': 1e-6, 'high': 1e-3, 'log': True},
      # Cost 3.6-7 points on centred, aligned images; standard on photos.
      'random_crop': {'choices': [True, False]},
      'random_flip': {'choices': [True, False]},
      'label_smoothing': {'low': 0.0, 'high': 0.2},
  }
