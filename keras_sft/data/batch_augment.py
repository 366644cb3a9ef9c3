"""MixUp, CutMix, RandAugment and Random Erasing on training batches, from
Keras 3's layers.

`create_batch_augmenter` returns a function `(batch_index, images, labels) ->
(images, labels)` for `tf.data.Dataset.map` after `batch`, or None when every
switch is off. It uses `keras.layers.RandAugment`, `keras.layers.MixUp` and
`keras.layers.CutMix`, `keras.layers.RandomErasing` as they are; only where
their random numbers come from is changed:

Those layers draw from a stateful `keras.random.SeedGenerator` (a variable
that each call advances). Inside tf.data that state starts over in every
process and, with a parallel map, advances in whatever order the batches
happen to be augmented: a resumed run (which skips the batches it already
trained on) would augment differently from an uninterrupted one. So each
layer gets a `_BatchSeeds` generator instead, which hands out stateless seeds
derived from `(seed, index of the batch in the stream)`; the augmentation of
a batch then depends on nothing else, and `start_step` resumes exactly.

Each augmentation is one `BatchAugmentation` entry of `BATCH_AUGMENTATIONS`
(its config keys, its Keras layer, its own random stream); adding one is an
entry plus its tests, and `pipeline.from_config` passes its keys through.
Order per batch: the image entries first, in table order (RandAugment, on
the un-mixed images; Keras' layer picks the same `num_ops` operations for the
whole batch, with per-image strengths; then Random Erasing, per image), then
one mixing entry (MixUp or
CutMix; several on: one per batch, chosen uniformly by a seeded draw, as
timm's `switch_prob=0.5` for two). Mixing makes the labels soft one-hot
`[N, num_classes]` float32 rows that sum to 1; without mixing they stay
class ids.

`keras.layers.AugMix` (Keras 3.15) is not offered: it picks the operations of
its chains with Python's `random.choice` while it is traced, so inside
tf.data every batch of a run would get the same chains (the bug Keras fixed
for RandAugment in keras-team/keras#21499, still in AugMix).
"""

import dataclasses
from typing import Callable

from absl import logging

import keras
import tensorflow as tf

from keras_sft import errors


# Keras' RandAugment unrolls its operations into the graph of every batch;
# the RandAugment paper (Cubuk et al. 2020) uses 1 to 3 of them.
MAX_RANDAUGMENT_NUM_OPS = 10


def check_config(config):
  """Checks the batch augmentation keys of the config."""
  _check(config.mixup_alpha, config.cutmix_alpha, config.randaugment_num_ops,
         config.randaugment_magnitude, config.random_erasing_probability)


def _check(mixup_alpha, cutmix_alpha, randaugment_num_ops,
           randaugment_magnitude, random_erasing_probability):
  errors.check_non_negative('mixup_alpha', mixup_alpha)
  errors.check_fraction('cutmix_alpha', cutmix_alpha, upper_inclusive=True)
  if not isinstance(randaugment_num_ops, int) or randaugment_num_ops < 0:
    raise errors.ConfigError('randaugment_num_ops must be an integer >= 0. '
                             'Received: randaugment_num_ops='
                             f'{randaugment_num_ops!r}')
  errors.check_at_most(
      'randaugment_num_ops', randaugment_num_ops, MAX_RANDAUGMENT_NUM_OPS,
      "unroll into every training batch's graph (Keras' RandAugment "
      'traces each operation), which would take hours to build')
  errors.check_fraction('randaugment_magnitude', randaugment_magnitude,
                        upper_inclusive=True)
  errors.check_fraction('random_erasing_probability',
                        random_erasing_probability, upper_inclusive=True)


class _BatchSeeds(keras.random.SeedGenerator):
  """A seed generator without state: seeds from a per-batch seed tensor.

  `next()` folds a call counter into `batch_seed`, a `[2]` int64 tensor set
  before each layer call (setting it restarts the counter, so the k-th draw
  of a layer call always gets the same seed). The parent's `__init__` is not
  run on purpose: it would create the state variable this class exists to
  avoid.
  """

  def __init__(self):  # pylint: disable=super-init-not-called
    self._batch_seed = None
    self._count = 0

  @property
  def batch_seed(self):
    return self._batch_seed

  @batch_seed.setter
  def batch_seed(self, value):
    self._batch_seed = value
    self._count = 0

  def next(self, ordered=True):
    del ordered
    if self.batch_seed is None:
      raise RuntimeError('_BatchSeeds used outside a batch augmentation.')
    self._count += 1
    return tf.random.experimental.stateless_fold_in(self.batch_seed,
                                                    self._count)


def _with_batch_seeds(layer):
  """Swaps `layer`'s stateful generator for a `_BatchSeeds` (before build)."""
  seeds = _BatchSeeds()
  # Keras' layers read their randomness from `layer.generator` via
  # `_get_seed_generator`; RandAugment passes its own to its sub-layers.
  layer.generator = seeds
  return seeds


def _randaugment(options, seed):
  if not (options['randaugment_num_ops'] and
          options['randaugment_magnitude']):
    return None
  return keras.layers.RandAugment(
      value_range=(0, 255), num_ops=options['randaugment_num_ops'],
      factor=options['randaugment_magnitude'], seed=seed)


def _random_erasing(options, seed):
  probability = options['random_erasing_probability']
  if not probability:
    return None
  # factor=(p, p): each image is erased with probability p (a single float
  # would draw each image's probability from [0, p]). Keras' own erased
  # area, scale=(0.02, 0.33) of each side's square, and fill (Gaussian
  # noise · 255, clipped to [0, 255]).
  return keras.layers.RandomErasing(factor=(probability, probability),
                                    value_range=(0, 255), seed=seed)


def _mixup(options, seed):
  if not options['mixup_alpha']:
    return None
  return keras.layers.MixUp(alpha=options['mixup_alpha'], seed=seed)


def _cutmix(options, seed):
  if not options['cutmix_alpha']:
    return None
  alpha = options['cutmix_alpha']
  return keras.layers.CutMix(factor=(alpha, alpha), seed=seed)


@dataclasses.dataclass(frozen=True)
class BatchAugmentation:
  """One augmentation of training batches.

  Attributes:
    name: Its name in logs and errors.
    keys: Its config keys with their "off" values.
    create: `create(options, seed)`: its Keras layer, or None when its keys
      switch it off (`options` maps config keys to values).
    stream: A fixed id of its random stream, folded into the batch's seed
      (never reused: a new entry takes a new id, so the others' randomness
      stays as it was).
    mixes: Whether it mixes images and labels (MixUp, CutMix): one mixing
      entry per batch, after the others.
  """
  name: str
  keys: dict
  create: Callable
  stream: int
  mixes: bool = False


BATCH_AUGMENTATIONS = (
    BatchAugmentation('randaugment', {'randaugment_num_ops': 0,
                                      'randaugment_magnitude': 0.0},
                      _randaugment, stream=1),
    BatchAugmentation('random_erasing', {'random_erasing_probability': 0.0},
                      _random_erasing, stream=5),
    BatchAugmentation('mixup', {'mixup_alpha': 0.0}, _mixup, stream=2,
                      mixes=True),
    BatchAugmentation('cutmix', {'cutmix_alpha': 0.0}, _cutmix, stream=3,
                      mixes=True),
)
# The stream of the draw that picks one mixing entry per batch.
_CHOICE_STREAM = 4
# Every entry's config keys, with their "off" values.
OFF = {key: value for entry in BATCH_AUGMENTATIONS
       for key, value in entry.keys.items()}


def options_from_config(config):
  """`{key: value}` of every entry's config keys."""
  return {key: config[key] for key in OFF}


def create_batch_augmenter(num_classes, *, seed=0, **options):
  """Returns the batch augmentation function, or None if all are off.

  Args:
    num_classes: Width of the one-hot labels produced when mixing.
    seed: Seeds every random choice, together with the batch index.
    **options: The entries' config keys (default: off):
      randaugment_num_ops: Operations RandAugment applies per batch; 0: off.
      randaugment_magnitude: RandAugment's `factor` in [0, 1] (timm's
        magnitude m corresponds to m / 10).
      mixup_alpha: α of MixUp's Beta(α, α) mixing weight; 0: off.
      cutmix_alpha: α of CutMix's Beta(α, α) area weight, in (0, 1]
        (`keras.layers.CutMix(factor=(α, α))`); 0: off.
      random_erasing_probability: Probability in [0, 1] that Random Erasing
        replaces a random rectangle of an image with noise; 0: off.

  Returns:
    `augment(batch_index, images, labels) -> (images, labels)` for images
    float32 `[N, H, W, 3]` in [0, 255] and int labels `[N]`, or None.

  Raises:
    ConfigError: An unknown key or a bad value.
  """
  for key in options:
    errors.check_choice('batch augmentation key', key, tuple(OFF))
  options = {**OFF, **options}
  _check(options['mixup_alpha'], options['cutmix_alpha'],
         options['randaugment_num_ops'], options['randaugment_magnitude'],
         options['random_erasing_probability'])
  if options['randaugment_num_ops'] and not options['randaugment_magnitude']:
    # Not an error: runs and studies written with it must still resume.
    logging.warning(
        'randaugment_num_ops=%d with randaugment_magnitude=%r applies no '
        'RandAugment: the magnitude is its strength. Set it in (0, 1] '
        '(0.5 is timm\'s m5; a self-training student\'s is '
        'self_training_randaugment_magnitude), or randaugment_num_ops=0.',
        options['randaugment_num_ops'], options['randaugment_magnitude'])
  layers = []  # (entry, layer, its _BatchSeeds)
  for entry in BATCH_AUGMENTATIONS:
    layer = entry.create(options, seed)
    if layer is not None:
      layers.append((entry, layer, _with_batch_seeds(layer)))
  if not layers:
    return None
  transforms = [item for item in layers if not item[0].mixes]
  mixers = [item for item in layers if item[0].mixes]

  def stream_seed(batch_seed, stream):
    # A different stream per entry: fold in its fixed id.
    return tf.random.experimental.stateless_fold_in(batch_seed, stream)

  def mix(item, batch_seed, images, labels):
    entry, layer, seeds = item
    seeds.batch_seed = stream_seed(batch_seed, entry.stream)
    out = layer({'images': images, 'labels': labels}, training=True)
    return (tf.cast(out['images'], tf.float32),
            tf.cast(out['labels'], tf.float32))

  def augment(batch_index, images, labels):
    batch_seed = tf.stack([tf.cast(seed, tf.int64),
                           tf.cast(batch_index, tf.int64)])
    images = tf.cast(images, tf.float32)
    for entry, layer, seeds in transforms:
      seeds.batch_seed = stream_seed(batch_seed, entry.stream)
      images = tf.cast(layer(images, training=True), tf.float32)
    if not mixers:
      return images, labels
    labels = tf.one_hot(tf.cast(labels, tf.int32), num_classes,
                        dtype=tf.float32)
    if len(mixers) == 1:
      return mix(mixers[0], batch_seed, images, labels)
    draw = tf.random.stateless_uniform(
        [], stream_seed(batch_seed, _CHOICE_STREAM))
    index = tf.minimum(tf.cast(draw * len(mixers), tf.int32),
                       len(mixers) - 1)
    return tf.switch_case(index, [
        (lambda item=item: mix(item, batch_seed, images, labels))
        for item in mixers])

  return augment
