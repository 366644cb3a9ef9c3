"""MixUp, CutMix and RandAugment on training batches, from Keras 3's layers.

`create_batch_augmenter` returns a function `(batch_index, images, labels) ->
(images, labels)` for `tf.data.Dataset.map` after `batch`, or None when every
switch is off. It uses `keras.layers.RandAugment`, `keras.layers.MixUp` and
`keras.layers.CutMix` as they are; only where their random numbers come from
is changed:

Those layers draw from a stateful `keras.random.SeedGenerator` (a variable
that each call advances). Inside tf.data that state starts over in every
process and, with a parallel map, advances in whatever order the batches
happen to be augmented: a resumed run (which skips the batches it already
trained on) would augment differently from an uninterrupted one. So each
layer gets a `_BatchSeeds` generator instead, which hands out stateless seeds
derived from `(seed, index of the batch in the stream)`; the augmentation of
a batch then depends on nothing else, and `start_step` resumes exactly.

Order per batch: RandAugment first (on the un-mixed images; Keras' layer picks
the same `num_ops` operations for the whole batch, with per-image strengths),
then MixUp or CutMix (both on: one of the two per batch, chosen by a fair
seeded coin, as timm's `switch_prob=0.5`). Mixing makes the labels soft
one-hot `[N, num_classes]` float32 rows that sum to 1; without mixing they
stay class ids.
"""

import keras
import tensorflow as tf

from keras_sft import errors


# Keras' RandAugment unrolls its operations into the graph of every batch;
# the RandAugment paper (Cubuk et al. 2020) uses 1 to 3 of them.
MAX_RANDAUGMENT_NUM_OPS = 10


def check_config(config):
  """Checks the batch augmentation keys of the config."""
  _check(config.mixup_alpha, config.cutmix_alpha, config.randaugment_num_ops,
         config.randaugment_magnitude)


def _check(mixup_alpha, cutmix_alpha, randaugment_num_ops,
           randaugment_magnitude):
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


def create_batch_augmenter(num_classes, *, mixup_alpha=0.0, cutmix_alpha=0.0,
                           randaugment_num_ops=0, randaugment_magnitude=0.0,
                           seed=0):
  """Returns the batch augmentation function, or None if all are off.

  Args:
    num_classes: Width of the one-hot labels produced when mixing.
    mixup_alpha: α of MixUp's Beta(α, α) mixing weight; 0: off.
    cutmix_alpha: α of CutMix's Beta(α, α) area weight, in (0, 1]
      (`keras.layers.CutMix(factor=(α, α))`); 0: off.
    randaugment_num_ops: Operations RandAugment applies per batch; 0: off.
    randaugment_magnitude: RandAugment's `factor` in [0, 1] (timm's magnitude
      m corresponds to m / 10).
    seed: Seeds every random choice, together with the batch index.

  Returns:
    `augment(batch_index, images, labels) -> (images, labels)` for images
    float32 `[N, H, W, 3]` in [0, 255] and int labels `[N]`, or None.
  """
  _check(mixup_alpha, cutmix_alpha, randaugment_num_ops,
         randaugment_magnitude)
  layers = []  # (name, layer, its _BatchSeeds)
  if randaugment_num_ops and randaugment_magnitude:
    layer = keras.layers.RandAugment(
        value_range=(0, 255), num_ops=randaugment_num_ops,
        factor=randaugment_magnitude, seed=seed)
    layers.append(('randaugment', layer, _with_batch_seeds(layer)))
  if mixup_alpha:
    layer = keras.layers.MixUp(alpha=mixup_alpha, seed=seed)
    layers.append(('mixup', layer, _with_batch_seeds(layer)))
  if cutmix_alpha:
    layer = keras.layers.CutMix(factor=(cutmix_alpha, cutmix_alpha),
                                seed=seed)
    layers.append(('cutmix', layer, _with_batch_seeds(layer)))
  if not layers:
    return None
  by_name = {name: (layer, seeds) for name, layer, seeds in layers}
  mixing = bool(mixup_alpha or cutmix_alpha)

  def layer_seed(batch_seed, name):
    # A different stream per layer: fold in a fixed id for each.
    ids = {'randaugment': 1, 'mixup': 2, 'cutmix': 3, 'coin': 4}
    return tf.random.experimental.stateless_fold_in(batch_seed, ids[name])

  def mix(name, batch_seed, images, labels):
    layer, seeds = by_name[name]
    seeds.batch_seed = layer_seed(batch_seed, name)
    out = layer({'images': images, 'labels': labels}, training=True)
    return (tf.cast(out['images'], tf.float32),
            tf.cast(out['labels'], tf.float32))

  def augment(batch_index, images, labels):
    batch_seed = tf.stack([tf.cast(seed, tf.int64),
                           tf.cast(batch_index, tf.int64)])
    images = tf.cast(images, tf.float32)
    if 'randaugment' in by_name:
      layer, seeds = by_name['randaugment']
      seeds.batch_seed = layer_seed(batch_seed, 'randaugment')
      images = tf.cast(layer(images, training=True), tf.float32)
    if not mixing:
      return images, labels
    labels = tf.one_hot(tf.cast(labels, tf.int32), num_classes,
                        dtype=tf.float32)
    if 'mixup' in by_name and 'cutmix' in by_name:
      coin = tf.random.stateless_uniform([], layer_seed(batch_seed, 'coin'))
      return tf.cond(coin < 0.5,
                     lambda: mix('mixup', batch_seed, images, labels),
                     lambda: mix('cutmix', batch_seed, images, labels))
    return mix('mixup' if 'mixup' in by_name else 'cutmix', batch_seed,
               images, labels)

  return augment
