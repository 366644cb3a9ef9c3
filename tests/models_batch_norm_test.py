"""Tests of keras_sft.models.batch_norm: the fused layer computes what Keras' does."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_sft.models import batch_norm


def _inputs(shape=(8, 5, 5, 6), seed=0):
  # Far from the initial moving statistics (0, 1), so their updates show.
  rng = np.random.default_rng(seed)
  return rng.normal(3.0, 2.0, shape).astype(np.float32)


def _pair(shape, **kwargs):
  """Keras' layer and the fused one, built with the same random γ and β."""
  keras_layer = keras.layers.BatchNormalization(**kwargs)
  fused_layer = batch_norm.BatchNormalization(**kwargs)
  keras_layer.build(shape)
  fused_layer.build(shape)
  rng = np.random.default_rng(1)
  channels = keras_layer.moving_mean.shape
  for name in ('gamma', 'beta'):
    if getattr(keras_layer, name) is None:  # scale=False or center=False.
      continue
    value = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    getattr(keras_layer, name).assign(value)
    getattr(fused_layer, name).assign(value)
  return keras_layer, fused_layer


def _outputs_and_gradients(layer, inputs, training):
  inputs = tf.constant(inputs)
  weights = tf.range(inputs.shape[-1], dtype=tf.float32)
  with tf.GradientTape() as tape:
    tape.watch(inputs)
    outputs = layer(inputs, training=training)
    loss = tf.reduce_sum(tf.square(outputs) * weights)
  gradients = tape.gradient(loss, [inputs, layer.gamma, layer.beta])
  return [np.asarray(outputs)] + [np.asarray(g) for g in gradients]


@pytest.mark.parametrize('training', [True, False])
def test_fused_matches_keras_outputs_gradients_and_statistics(training):
  keras_layer, fused_layer = _pair((8, 5, 5, 6), momentum=0.9)
  inputs = _inputs()
  for step in range(2):  # The second step uses moved statistics.
    expected = _outputs_and_gradients(keras_layer, inputs + step, training)
    actual = _outputs_and_gradients(fused_layer, inputs + step, training)
    # d_inputs is a difference of terms as large as the gradient reaching
    # the outputs, 2·y·weight: rounding is relative to that.
    upstream = 2.0 * np.abs(expected[0]).max() * (inputs.shape[-1] - 1)
    scales = (1.0, upstream, 1.0, 1.0)
    for name, want, got, scale in zip(
        ('outputs', 'd_inputs', 'd_gamma', 'd_beta'), expected, actual,
        scales):
      scale = max(scale, np.abs(want).max())
      np.testing.assert_allclose(got / scale, want / scale, atol=2e-6,
                                 err_msg=name)
  for name in ('moving_mean', 'moving_variance'):
    np.testing.assert_allclose(getattr(fused_layer, name),
                               getattr(keras_layer, name), rtol=1e-6,
                               err_msg=name)
  # The statistics moved in training only (and by the biased variance).
  moved = not np.allclose(fused_layer.moving_variance, 1.0)
  assert moved == training


def test_moving_variance_of_a_single_value_per_channel():
  """n = 1: Keras' biased variance is 0; the Bessel correction must not NaN."""
  keras_layer, fused_layer = _pair((1, 1, 1, 4))
  inputs = _inputs((1, 1, 1, 4))
  keras_layer(inputs, training=True)
  fused_layer(inputs, training=True)
  np.testing.assert_allclose(fused_layer.moving_variance,
                             keras_layer.moving_variance)
  assert np.all(np.isfinite(fused_layer.moving_mean))


def test_non_trainable_layer_runs_in_inference_mode():
  keras_layer, fused_layer = _pair((8, 5, 5, 6))
  keras_layer.trainable = fused_layer.trainable = False
  inputs = _inputs()
  np.testing.assert_allclose(fused_layer(inputs, training=True),
                             keras_layer(inputs, training=True), atol=1e-5)
  np.testing.assert_array_equal(fused_layer.moving_mean, 0.0)


@pytest.mark.parametrize('kwargs, shape', [
    ({'axis': 1}, (8, 6, 5, 5)),  # channels_first
    ({}, (8, 6)),  # after a Dense layer
    ({'synchronized': True}, (8, 5, 5, 6)),
    ({'scale': False}, (8, 5, 5, 6)),
])
def test_unfusable_settings_run_keras_code(kwargs, shape):
  keras_layer, fused_layer = _pair(shape, **kwargs)
  inputs = _inputs(shape)
  np.testing.assert_allclose(fused_layer(inputs, training=True),
                             keras_layer(inputs, training=True), atol=1e-6)


def test_mixed_bfloat16_outputs_and_float32_statistics():
  keras_layer, fused_layer = _pair((8, 5, 5, 6), dtype='mixed_bfloat16')
  inputs = tf.cast(_inputs(), tf.bfloat16)
  expected = keras_layer(inputs, training=True)
  actual = fused_layer(inputs, training=True)
  assert actual.dtype == tf.bfloat16
  assert fused_layer.moving_variance.dtype == 'float32'
  np.testing.assert_allclose(tf.cast(actual, tf.float32),
                             tf.cast(expected, tf.float32), atol=0.02)


def _small_resnet_like():
  inputs = keras.Input((8, 8, 3), name='images')
  x = keras.layers.Conv2D(4, 3, name='conv1_conv')(inputs)
  x = keras.layers.BatchNormalization(name='conv1_bn')(x)
  x = keras.layers.ReLU(name='conv1_relu')(x)
  x = keras.layers.Conv2D(4, 1, name='conv2_conv')(x)
  x = keras.layers.BatchNormalization(name='conv2_bn', momentum=0.5)(x)
  x = keras.layers.GlobalAveragePooling2D(name='pool')(x)
  return keras.Model(inputs, keras.layers.Dense(3, name='head')(x))


def test_fuse_keeps_names_settings_weights_and_outputs():
  keras.utils.set_random_seed(0)
  model = _small_resnet_like()
  model.get_layer('conv1_bn').trainable = False
  inputs = _inputs((4, 8, 8, 3))
  model(inputs, training=True)  # Moves conv2_bn's statistics off (0, 1).
  fused = batch_norm.fuse(model)
  assert fused is not model
  assert [layer.name for layer in fused.layers] == [
      layer.name for layer in model.layers]
  for name in ('conv1_bn', 'conv2_bn'):
    assert type(fused.get_layer(name)) is batch_norm.BatchNormalization  # pylint: disable=unidiomatic-typecheck
  assert not fused.get_layer('conv1_bn').trainable
  assert fused.get_layer('conv2_bn').momentum == 0.5
  for want, got in zip(model.get_weights(), fused.get_weights()):
    np.testing.assert_array_equal(got, want)
  for training in (False, True):
    np.testing.assert_allclose(fused(inputs, training=training),
                               model(inputs, training=training), atol=1e-5)


def test_fused_model_round_trips_through_a_keras_file(tmp_path):
  keras.utils.set_random_seed(0)
  fused = batch_norm.fuse(_small_resnet_like())
  path = os.path.join(tmp_path, 'model.keras')
  fused.save(path)
  loaded = keras.models.load_model(path)
  assert type(loaded.get_layer('conv2_bn')) is batch_norm.BatchNormalization  # pylint: disable=unidiomatic-typecheck
  inputs = _inputs((2, 8, 8, 3))
  np.testing.assert_allclose(loaded(inputs), fused(inputs), atol=1e-6)


def test_weight_files_move_between_keras_and_fused_layers(tmp_path):
  """Keras keys a layer's weights by class name: the names must agree."""
  keras.utils.set_random_seed(0)
  model = _small_resnet_like()
  model(_inputs((4, 8, 8, 3)), training=True)
  fused = batch_norm.fuse(model)
  for source, target in ((model, fused), (fused, model)):
    path = str(tmp_path / 'model.weights.h5')
    source.save_weights(path)
    keras.utils.set_random_seed(1)
    fresh = batch_norm.fuse(_small_resnet_like()) if target is fused else (
        _small_resnet_like())
    fresh.load_weights(path)
    for want, got in zip(source.get_weights(), fresh.get_weights()):
      np.testing.assert_array_equal(got, want)


def test_values_per_channel_past_two_to_the_31_elements():
  """conv1 of ResNet50 at 384 px, a batch of 1,000 per replica: 2.36e9
  values, more than int32 holds. Traced only (no 9 GB tensor): with a
  static shape the count is a graph constant."""
  shape = (1000, 192, 192, 64)
  function = tf.function(batch_norm._values_per_channel).get_concrete_function(  # pylint: disable=protected-access
      tf.TensorSpec(shape, tf.float32))
  # The count depends on the shape only, so it runs without an input fed.
  with tf.compat.v1.Session(graph=function.graph) as session:
    count = session.run(function.outputs[0])
  assert count == 1000 * 192 * 192


def test_values_per_channel_of_an_unknown_batch_size():
  count = tf.function(
      batch_norm._values_per_channel,  # pylint: disable=protected-access
      input_signature=[tf.TensorSpec((None, 5, 5, 6), tf.float32)])
  assert float(count(tf.zeros((7, 5, 5, 6)))) == 7 * 5 * 5
