"""Tests of mixed precision with the CE + λ·R(θ) train_step."""

import keras
import numpy as np
import pytest

from keras_sft.models import classifier
from keras_sft.training import precision

_LAMBDA = 0.05


def _model(policy):
  with precision.global_policy(policy):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 3))
    # No conv bias: before BN its gradient is 0 up to rounding noise.
    x = keras.layers.Conv2D(4, 3, use_bias=False, name='conv')(inputs)
    x = keras.layers.BatchNormalization(name='bn')(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, dtype='float32', name='head')(x)
    model = classifier.Classifier(keras.Model(inputs, outputs), _LAMBDA)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model(np.zeros((1, 8, 8, 3), np.float32))
  return model


def _batch():
  rng = np.random.default_rng(0)
  return (rng.uniform(0, 1, (8, 8, 8, 3)).astype(np.float32),
          rng.integers(0, 5, 8).astype(np.int64))


def test_policy_is_scoped_and_restored():
  before = keras.config.dtype_policy().name
  model = _model('mixed_bfloat16')
  assert keras.config.dtype_policy().name == before
  assert model.network.get_layer('conv').compute_dtype == 'bfloat16'
  assert model.network.get_layer('conv').kernel.dtype == 'float32'
  assert model.network.get_layer('head').compute_dtype == 'float32'


def test_bf16_regularization_equals_float32_value():
  reference = _model('float32')
  mixed = _model('mixed_bfloat16')
  mixed.set_weights(reference.get_weights())
  kernels = [reference.network.get_layer(n).kernel for n in ('conv', 'head')]
  expected = _LAMBDA * sum(
      float(np.sum(np.square(np.asarray(k, np.float64)))) for k in kernels)
  value = mixed.regularization()
  assert value.dtype == 'float32'
  np.testing.assert_allclose(float(value), expected, rtol=1e-6)
  # Also inside a training step: the logged l2 is the float32 value.
  x, y = _batch()
  logs = mixed.train_on_batch(x, y, return_dict=True)
  assert np.isfinite(logs['loss'])


def test_float16_step_uses_loss_scaling_and_moves_like_float32():
  reference = _model('float32')
  mixed = _model('mixed_float16')
  mixed.set_weights(reference.get_weights())
  assert isinstance(mixed.optimizer, keras.optimizers.LossScaleOptimizer)
  before = [np.asarray(v) for v in reference.trainable_variables]
  x, y = _batch()
  reference.train_on_batch(x, y)
  mixed.train_on_batch(x, y)
  assert int(mixed.optimizer.iterations.numpy()) == 1  # not skipped
  for start, ref_var, mixed_var in zip(before, reference.trainable_variables,
                                       mixed.trainable_variables):
    ref_step = np.asarray(ref_var) - start
    mixed_step = np.asarray(mixed_var) - start
    assert np.isfinite(mixed_step).all()
    # Same direction and size as the float32 update, up to fp16 rounding.
    cosine = np.sum(ref_step * mixed_step) / (
        np.linalg.norm(ref_step) * np.linalg.norm(mixed_step) + 1e-30)
    assert cosine > 0.99, (ref_var.path, cosine)
    np.testing.assert_allclose(np.linalg.norm(mixed_step),
                               np.linalg.norm(ref_step), rtol=0.05)


@pytest.mark.parametrize('gpus, flags, expected', [
    ([(9, 0)], set(), 'mixed_bfloat16'),
    ([(7, 5)], {'avx512_bf16'}, 'float32'),
    ([], {'avx512f', 'avx512_bf16'}, 'mixed_bfloat16'),
    ([], {'amx_bf16'}, 'mixed_bfloat16'),
    ([], {'avx2'}, 'float32'),
])
def test_auto_picks_bf16_where_the_hardware_has_it(gpus, flags, expected):
  assert precision.resolve_policy('auto', gpus, flags) == expected
  assert precision.resolve_policy('mixed_float16', gpus, flags) == (
      'mixed_float16')


def test_unknown_policy_is_named():
  with pytest.raises(ValueError, match="precision='half'"):
    precision.resolve_policy('half')
