"""Tests of keras_sft.models.precise_bn: moving statistics = population statistics.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_sft.models import batch_norm
from keras_sft.models import precise_bn

_BATCH, _BATCHES, _SIDE = 8, 3, 6


def _model(frozen_second=False):
  keras.utils.set_random_seed(0)
  inputs = keras.Input((_SIDE, _SIDE, 3))
  x = keras.layers.Conv2D(4, 3, padding='same', name='conv1')(inputs)
  x = batch_norm.BatchNormalization(name='bn1')(x)
  x = keras.layers.ReLU()(x)
  x = keras.layers.Conv2D(5, 3, padding='same', name='conv2')(x)
  second = batch_norm.BatchNormalization(name='bn2')
  x = second(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  x = keras.layers.Dropout(0.5)(x)
  model = keras.Model(inputs, keras.layers.Dense(2, name='head')(x))
  if frozen_second:
    second.trainable = False
  return model


def _batches():
  rng = np.random.default_rng(1)
  images = (rng.normal(size=(_BATCH * _BATCHES, _SIDE, _SIDE, 3)) * 3 +
            5).astype(np.float32)
  labels = np.zeros(len(images), np.int64)
  return images, tf.data.Dataset.from_tensor_slices(
      (images, labels)).batch(_BATCH)


def _population(values):
  """Mean and biased variance per channel over everything but the last axis."""
  flat = np.concatenate([v.reshape(-1, v.shape[-1]) for v in values])
  flat = flat.astype(np.float64)
  return flat.mean(axis=0), flat.var(axis=0)


def _layer_inputs(model, name, images, replicas):
  """Inputs of layer `name` in training mode, each replica's half batched."""
  probe = keras.Model(model.input, model.get_layer(name).input)
  parts = []
  for start in range(0, len(images), _BATCH):
    batch = images[start:start + _BATCH]
    for half in np.split(batch, replicas):
      parts.append(np.asarray(probe(half, training=True)))
  return parts


@pytest.mark.parametrize('replicas', [1, 2])
def test_moving_statistics_become_the_population_statistics(replicas):
  images, batches = _batches()
  # Reduction by copying, not collectives: collective keys of several
  # MirroredStrategy objects in one process collide.
  strategy = (tf.distribute.MirroredStrategy(
      ['/cpu:0', '/cpu:1'],
      cross_device_ops=tf.distribute.ReductionToOneDevice())
              if replicas == 2 else tf.distribute.get_strategy())
  with strategy.scope():
    model = _model()
  assert precise_bn.reestimate(model, batches, strategy) == 2
  # Expected values from a model on one device with the same weights, each
  # replica's part of a batch normalized with its own batch statistics.
  reference = _model()
  reference.set_weights([np.asarray(w) for w in model.weights])
  for name in ('bn1', 'bn2'):
    mean, variance = _population(
        _layer_inputs(reference, name, images, replicas))
    layer = model.get_layer(name)
    np.testing.assert_allclose(np.asarray(layer.moving_mean), mean,
                               rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.asarray(layer.moving_variance), variance,
                               rtol=1e-5, atol=1e-5, err_msg=name)
    # Not what Keras' initial or momentum statistics would be.
    assert not np.allclose(np.asarray(layer.moving_variance), 1.0)


def test_corrupted_statistics_evaluate_as_before_after_reestimation():
  images, batches = _batches()
  model = _model()
  precise_bn.reestimate(model, batches)
  before = np.asarray(model(images, training=False))
  rng = np.random.default_rng(2)
  for name in ('bn1', 'bn2'):
    layer = model.get_layer(name)
    layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape) * 10)
    layer.moving_variance.assign(rng.uniform(5, 50,
                                             layer.moving_variance.shape))
  assert not np.allclose(np.asarray(model(images, training=False)), before,
                         atol=1e-3)
  precise_bn.reestimate(model, batches)
  np.testing.assert_allclose(np.asarray(model(images, training=False)),
                             before, rtol=1e-5, atol=1e-5)


def test_frozen_layers_keep_their_statistics_and_dropout_is_restored():
  _, batches = _batches()
  model = _model(frozen_second=True)
  frozen = model.get_layer('bn2')
  frozen.moving_mean.assign(np.full(5, 7.0, np.float32))
  assert precise_bn.reestimate(model, batches) == 1
  np.testing.assert_array_equal(np.asarray(frozen.moving_mean), 7.0)
  assert [layer.rate for layer in model.layers
          if isinstance(layer, keras.layers.Dropout)] == [0.5]


def test_no_batches_is_an_error():
  _, batches = _batches()
  with pytest.raises(ValueError, match='no batches'):
    precise_bn.reestimate(_model(), batches.take(0))


def test_batches_with_sample_weights_give_the_same_statistics():
  """Training batches carry class weights (class_weight): ignored here."""
  images, batches = _batches()
  model = _model()
  precise_bn.reestimate(model, batches)
  expected = [np.asarray(w) for w in model.weights]
  weighted = batches.map(lambda x, y: (x, y, tf.ones_like(y, tf.float32)))
  model = _model()
  precise_bn.reestimate(model, weighted)
  for want, got in zip(expected, model.weights):
    np.testing.assert_array_equal(np.asarray(got), want)
