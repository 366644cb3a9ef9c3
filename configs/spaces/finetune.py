"""The fine-tuning search space: which layers, which learning rate, and the
recipe switches this project measured to matter (benchmarks/ACCURACY.md).

    python -m keras_sft.tune --config=configs/cifar10_resnet50_cpu.py \
        --workdir=/tmp/study --space=configs/spaces/finetune.py --trials=12

The categorical keys come in the order that `keras_sft.tune` tries them
one at a time against the defaults (its --variant_trials, half the trials
after the defaults by default): the switches whose sign flipped between
datasets first.

Keys are those of configs/default.py. `{'low', 'high', 'log'}` is a range
(integers for an int key), `{'choices': [...]}` a list of values. Stage
names are ResNet's (`conv1` ... `conv5`); for another `--config.model` use
its stages (README "Backbones"): a stage the model lacks is refused before
the first trial.
"""


def get_space():
  """Returns {config key: range}."""
  return {
      # Peak learning rate per 256 images (scaled with the batch size).
      'learning_rate': {'low': 1e-3, 'high': 0.1, 'log': True},
      # λ of the L2 term.
      'weight_decay': {'low': 1e-6, 'high': 1e-3, 'log': True},
      # Frozen BN won by 1.2 points on Fashion-MNIST and lost by 14.8 on
      # photos with other classes: measure it.
      'batch_norm': {'choices': ['trained', 'frozen']},
      # Cost 3.6-7 points on centred, aligned images; standard on photos.
      'random_crop': {'choices': [True, False]},
      'random_flip': {'choices': [True, False]},
      # Freeze the backbone up to this stage (None: train every layer).
      'freeze_until': {'choices': [None, 'conv1', 'conv2', 'conv3', 'conv4']},
      'label_smoothing': {'low': 0.0, 'high': 0.2},
      # Epochs of head-only training before the whole network trains.
      'head_only_epochs': {'low': 0.0, 'high': 2.0},
      'backbone_learning_rate_multiplier': {'low': 0.1, 'high': 1.0,
                                            'log': True},
  }
