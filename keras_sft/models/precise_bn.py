"""Precise BatchNorm: moving statistics re-estimated for the weights at hand.

A BatchNormalization layer evaluates with moving averages of the batch
statistics it saw in training (momentum 0.99 in Keras' ResNet50: a window of
~100 steps). They lag weights that change fast, which is exactly the
situation of short runs, small datasets, fine-tuning to a new domain, and
EMA weights (whose statistics were never averaged at all). `reestimate`
replaces the moving mean and variance of every trainable BatchNormalization
layer by the population mean and (biased) variance of the layer's inputs
over a number of batches, computed with the current weights in training
mode: "precise BN" (Wu and Johnson 2021; pycls, Detectron2). Frozen layers
(non-trainable: inference mode) keep their statistics.

Per replica and batch, each layer contributes the count, mean and sum of
squared deviations of its inputs (computed in float32 in two passes, so no
catastrophic cancellation); the values of all replicas (and workers) are
gathered and combined on the host in float64 (Chan et al.'s pairwise
formula), so every replica and worker sets the same statistics.
"""

import logging
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_sft import errors
from keras_sft.models import batch_norm


def check_config(config):
  """Checks `config.precise_bn_batches`."""
  errors.check_integer('precise_bn_batches', config.precise_bn_batches, 0,
                       ' (0: off)')


def batch_count(requested, num_train_examples, global_batch_size):
  """Batches of an estimate: `requested`, at most one pass over the split.

  The training stream is endless, so more batches than the split holds
  would re-read the same images (precise_bn_batches=10**11 never ended);
  the population statistics of one pass are already exact.

  Args:
    requested: `config.precise_bn_batches` (> 0).
    num_train_examples: Examples in the train split.
    global_batch_size: Images per batch.

  Returns:
    `min(requested, num_train_examples // global_batch_size)` (at least 1).
  """
  return max(1, min(requested, num_train_examples // global_batch_size))


def log_if_capped(requested, num_train_examples, global_batch_size):
  """Says in the log that `batch_count` uses fewer batches than requested."""
  count = batch_count(requested, num_train_examples, global_batch_size)
  if count < requested:
    logging.warning(
        'precise_bn_batches=%d is more than one pass over the train split '
        '(%d examples, %d batches of %d): BN statistics are estimated on '
        'those %d batches. Set --config.precise_bn_batches=%d or less to '
        'silence this.', requested, num_train_examples, count,
        global_batch_size, count, count)


def trainable_batch_norm_layers(model):
  """The BatchNormalization layers of `model` that train (and are estimated).
  """
  return [layer for layer in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
          if isinstance(layer, keras.layers.BatchNormalization)
          and layer.trainable]


def _without_dropout(model):
  """Sets every Dropout rate to 0; returns the rates to put back."""
  rates = {}
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if isinstance(layer, keras.layers.Dropout):
      rates[layer] = layer.rate
      layer.rate = 0.0
  return rates


# Per model: its strategy, the traced statistics step and the layers in the
# order the step collects them, so that repeated re-estimations trace once.
_STEPS = weakref.WeakKeyDictionary()


def _statistics_step(model, strategy):
  """Returns `(step, call_order)`; see `reestimate`."""
  cached = _STEPS.get(model)
  if cached is not None and cached[0] is strategy:
    return cached[1:]
  call_order = []

  def replica_step(images):
    with batch_norm.collect_statistics() as collected:
      model(images, training=True)
    # Recorded while tracing: which layer each collected entry belongs to.
    call_order[:] = [entry[0] for entry in collected]
    return [[tf.reshape(value, [1, -1]) for value in entry[1:]]
            for entry in collected]

  @tf.function
  def step(images):
    per_replica = strategy.run(replica_step, args=(images,))
    return tf.nest.map_structure(
        lambda value: strategy.gather(value, axis=0), per_replica)

  _STEPS[model] = (strategy, step, call_order)
  return step, call_order


def _combine(count, mean, m2, other_count, other_mean, other_m2):
  """Chan et al.: statistics of the union of two disjoint sets."""
  total = count + other_count
  delta = other_mean - mean
  mean = mean + delta * (other_count / total)
  m2 = m2 + other_m2 + delta**2 * (count * other_count / total)
  return total, mean, m2


def reestimate(model, batches, strategy=None):
  """Sets the moving statistics of `model`'s trainable BN layers.

  Args:
    model: A Keras model whose BatchNormalization layers are
      `keras_sft.models.batch_norm.BatchNormalization` (models built by
      `keras_sft.models.backbones` are).
    batches: A finite `tf.data.Dataset` of `(images, labels)` batches (global
      batches under a strategy); labels are ignored.
    strategy: The `tf.distribute` strategy the model was built under; None:
      the current one.

  Returns:
    The number of layers re-estimated.

  Raises:
    ValueError: `batches` yielded nothing.
  """
  layers = trainable_batch_norm_layers(model)
  if not layers:
    return 0
  not_ours = [layer.name for layer in layers
              if not isinstance(layer, batch_norm.BatchNormalization)]
  if not_ours:
    raise ValueError('Precise BN needs keras_sft.models.batch_norm layers '
                     f'(batch_norm.fuse(model)). Received Keras layers: '
                     f'{not_ours[:5]}')
  strategy = strategy or tf.distribute.get_strategy()
  step, call_order = _statistics_step(model, strategy)
  rates = _without_dropout(model)
  totals = None
  num_batches = 0
  try:
    # Training batches may carry sample weights (class_weight): unused.
    for images, *_ in strategy.experimental_distribute_dataset(batches):
      gathered = step(images)
      num_batches += 1
      if totals is None:
        totals = [None] * len(gathered)
      for index, (counts, means, m2s) in enumerate(gathered):
        counts, means, m2s = (np.asarray(value, np.float64)
                              for value in (counts, means, m2s))
        for count, mean, m2 in zip(counts[:, 0], means, m2s):
          totals[index] = ((count, mean, m2) if totals[index] is None else
                           _combine(*totals[index], count, mean, m2))
  finally:
    for layer, rate in rates.items():
      layer.rate = rate
  if not num_batches:
    raise ValueError('Precise BN received no batches.')
  if sorted(map(id, call_order)) != sorted(map(id, layers)):
    raise ValueError(f'{len(call_order)} BatchNormalization calls collected '
                     f'for {len(layers)} trainable layers: a layer called '
                     'twice per step is not supported.')
  for layer, (count, mean, m2) in zip(call_order, totals):
    layer.moving_mean.assign(mean.astype(np.float32))
    layer.moving_variance.assign((m2 / count).astype(np.float32))
  logging.info('Precise BN: re-estimated %d BatchNormalization layers on %d '
               'batches.', len(layers), num_batches)
  return len(layers)

