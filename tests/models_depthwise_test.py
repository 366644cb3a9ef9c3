"""Tests of keras_sft.models.depthwise: the layer computes what Keras' Conv2D does."""

import keras
import numpy as np
import tensorflow as tf

from keras_sft.models import depthwise


def _pair(**kwargs):
  """Keras' grouped Conv2D and ours, with the same random weights."""
  keras_layer = keras.layers.Conv2D(**kwargs)
  ours = depthwise.Conv2D(**kwargs)
  shape = (2, 6, 6, kwargs['filters'])
  keras_layer.build(shape)
  ours.build(shape)
  rng = np.random.default_rng(0)
  for variable, other in zip(keras_layer.weights, ours.weights):
    value = rng.normal(0, 1, variable.shape).astype(np.float32)
    variable.assign(value)
    other.assign(value)
  return keras_layer, ours


def _outputs_and_gradients(layer, inputs):
  inputs = tf.constant(inputs)
  with tf.GradientTape() as tape:
    tape.watch(inputs)
    outputs = layer(inputs)
    loss = tf.reduce_sum(outputs * outputs)
  gradients = tape.gradient(loss, [inputs] + [v.value for v in layer.weights])
  return [keras.ops.convert_to_numpy(outputs)] + [
      keras.ops.convert_to_numpy(g) for g in gradients]


def test_depthwise_conv2d_matches_keras_grouped_conv2d():
  keras_layer, ours = _pair(filters=8, kernel_size=7, padding='same',
                            groups=8, activation='relu')
  assert depthwise.is_depthwise(ours)
  assert [v.shape for v in ours.weights] == [(7, 7, 1, 8), (8,)]
  inputs = np.random.default_rng(1).normal(0, 1, (2, 6, 6, 8)).astype(
      np.float32)
  for expected, actual in zip(_outputs_and_gradients(keras_layer, inputs),
                              _outputs_and_gradients(ours, inputs)):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)


def test_replace_swaps_only_depthwise_layers_and_keeps_weights():
  inputs = keras.Input((6, 6, 4))
  x = keras.layers.Conv2D(4, 3, padding='same', groups=4, name='dw')(inputs)
  x = keras.layers.Conv2D(4, 3, padding='same', groups=2, name='grouped')(x)
  outputs = keras.layers.Conv2D(5, 1, name='pointwise')(x)
  model = keras.Model(inputs, outputs)
  replaced = depthwise.replace(model)
  assert type(replaced.get_layer('dw')) is depthwise.Conv2D  # pylint: disable=unidiomatic-typecheck
  for name in ('grouped', 'pointwise'):
    assert type(replaced.get_layer(name)) is keras.layers.Conv2D, name  # pylint: disable=unidiomatic-typecheck
  images = np.random.default_rng(2).normal(0, 1, (2, 6, 6, 4)).astype(
      np.float32)
  np.testing.assert_allclose(replaced(images), model(images), rtol=1e-5,
                             atol=1e-5)
  plain = keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs))
  assert depthwise.replace(plain) is plain
