"""BiT-HyperRule: fine-tuning hyperparameters from the dataset's size.

Kolesnikov et al. 2020, "Big Transfer (BiT)", arXiv 1912.11370v3, Sec. 3.3:
SGD with initial learning rate 0.003, momentum 0.9, batch size 512. Images
with an area smaller than 96 x 96 pixels are resized to 160 x 160 and
randomly cropped to 128 x 128; larger ones resized to 448 x 448 and cropped
to 384 x 384. Tasks with fewer than 20k labeled examples are small (500
steps), fewer than 500k medium (10k steps), else large (20k steps); the
learning rate decays by a factor of 10 at 30%, 60% and 90% of the steps.
MixUp with α = 0.1 for medium and large tasks. Sec. 2: no weight decay and no
dropout during transfer.

(The big_transfer repository's code adds a linear warmup and, for small
tasks, other boundaries; this module follows the paper's text. Warmup stays
the config's `warmup_epochs`.)
"""

import dataclasses
import logging

# Sec. 3.3, verbatim numbers.
LEARNING_RATE = 0.003
MOMENTUM = 0.9
BATCH_SIZE = 512
SMALL_TASK_EXAMPLES = 20_000
MEDIUM_TASK_EXAMPLES = 500_000
STEPS = {'small': 500, 'medium': 10_000, 'large': 20_000}
BOUNDARY_FRACTIONS = (0.3, 0.6, 0.9)
DECAY_FACTOR = 0.1
MIXUP_ALPHA = 0.1
SMALL_IMAGE_AREA = 96 * 96


@dataclasses.dataclass(frozen=True)
class Choices:
  """The hyperparameters BiT-HyperRule picks for one dataset."""
  task_size: str  # 'small', 'medium' or 'large'
  resize_size: int
  crop_size: int
  total_steps: int
  boundaries: tuple  # steps where the LR is multiplied by decay_factor
  decay_factor: float
  mixup_alpha: float
  batch_size: int
  learning_rate: float
  momentum: float
  weight_decay: float
  dropout_rate: float


def bit_hyperrule(num_train_examples, image_height, image_width=None):
  """Returns BiT-HyperRule's `Choices` for a dataset.

  Args:
    num_train_examples: Labeled training examples.
    image_height: Typical image height in pixels.
    image_width: Typical image width (default: `image_height`).
  """
  image_width = image_height if image_width is None else image_width
  if num_train_examples <= 0 or image_height <= 0 or image_width <= 0:
    raise ValueError(
        'num_train_examples and the image sides must be positive. Received: '
        f'num_train_examples={num_train_examples}, image_height='
        f'{image_height}, image_width={image_width}')
  if image_height * image_width < SMALL_IMAGE_AREA:
    resize_size, crop_size = 160, 128
  else:
    resize_size, crop_size = 448, 384
  if num_train_examples < SMALL_TASK_EXAMPLES:
    task_size = 'small'
  elif num_train_examples < MEDIUM_TASK_EXAMPLES:
    task_size = 'medium'
  else:
    task_size = 'large'
  total_steps = STEPS[task_size]
  return Choices(
      task_size=task_size, resize_size=resize_size, crop_size=crop_size,
      total_steps=total_steps,
      boundaries=tuple(int(round(f * total_steps))
                       for f in BOUNDARY_FRACTIONS),
      decay_factor=DECAY_FACTOR,
      mixup_alpha=0.0 if task_size == 'small' else MIXUP_ALPHA,
      batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE, momentum=MOMENTUM,
      weight_decay=0.0, dropout_rate=0.0)


def apply_to_config(config, num_train_examples, image_side):
  """Sets the keys of `config` that BiT-HyperRule decides; logs each one.

  The schedule becomes step decay ('step', boundaries at 30/60/90%). The
  rule's total steps are split exactly into `num_epochs x steps_per_epoch`,
  steps_per_epoch being the largest divisor of the total that is at most
  num_train_examples // 512 (an "epoch" is then at most one pass).

  Args:
    config: An unlocked-values ConfigDict with the keys of
      keras_sft/default_config.py.
    num_train_examples: Examples in the train split.
    image_side: Side of the dataset's images (e.g. 32 for CIFAR-10).

  Returns:
    The `Choices` applied.
  """
  choices = bit_hyperrule(num_train_examples, image_side)
  most = max(1, num_train_examples // choices.batch_size)
  steps_per_epoch = max(d for d in range(1, most + 1)
                        if choices.total_steps % d == 0)
  num_epochs = choices.total_steps // steps_per_epoch
  settings = {
      'image_size': choices.crop_size,
      'resize_size': choices.resize_size,
      'global_batch_size': choices.batch_size,
      'learning_rate': choices.learning_rate,
      # The LR is given for this batch size: no linear scaling.
      'learning_rate_batch_size': choices.batch_size,
      'optimizer': 'sgd',
      'momentum': choices.momentum,
      'weight_decay': choices.weight_decay,
      'dropout_rate': choices.dropout_rate,
      'mixup_alpha': choices.mixup_alpha,
      'lr_schedule': 'step',
      'lr_boundary_fractions': BOUNDARY_FRACTIONS,
      'lr_decay_factor': choices.decay_factor,
      'steps_per_epoch': steps_per_epoch,
      'num_epochs': num_epochs,
  }
  logging.info('BiT-HyperRule: %d examples of %dpx images: a %s task, %d '
               'steps, LR x%g at steps %s.', num_train_examples, image_side,
               choices.task_size, choices.total_steps, choices.decay_factor,
               choices.boundaries)
  for key, value in settings.items():
    logging.info('BiT-HyperRule sets %s = %r', key, value)
    config[key] = value
  return choices
