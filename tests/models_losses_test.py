"""Tests of the cross-entropy with label smoothing and soft labels."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_sft.models import classifier
from keras_sft.models import losses


def _log_softmax(logits):
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _numpy_loss(ids, logits, epsilon):
  num_classes = logits.shape[-1]
  targets = np.eye(num_classes)[ids] * (1 - epsilon) + epsilon / num_classes
  return float(np.mean(-(targets * _log_softmax(logits)).sum(axis=-1)))


@pytest.mark.parametrize('epsilon', [0.0, 0.1, 0.3])
def test_label_smoothing_matches_the_formula(epsilon):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (6, 4)).astype(np.float32)
  ids = rng.integers(0, 4, 6)
  loss = losses.CrossEntropy(label_smoothing=epsilon)(ids, logits)
  np.testing.assert_allclose(float(loss), _numpy_loss(ids, logits, epsilon),
                             rtol=1e-5)


def test_smoothing_changes_the_loss_and_soft_labels_give_the_same_value():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 3, (5, 3)).astype(np.float32)
  ids = rng.integers(0, 3, 5)
  plain = float(losses.CrossEntropy()(ids, logits))
  smoothed = float(losses.CrossEntropy(0.2)(ids, logits))
  assert abs(plain - smoothed) > 1e-3
  one_hot = np.eye(3, dtype=np.float32)[ids]
  np.testing.assert_allclose(float(losses.CrossEntropy(0.2)(one_hot, logits)),
                             smoothed, rtol=1e-6)
  # Without smoothing, equal to Keras' own sparse cross-entropy.
  keras_value = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
      ids, logits)
  np.testing.assert_allclose(plain, float(keras_value), rtol=1e-5)


@pytest.mark.parametrize('epsilon', [0.0, 0.2])
@pytest.mark.parametrize('shape', [(6,), (6, 1)])
@pytest.mark.parametrize('dtype', [np.int32, np.int64])
def test_integer_ids_of_shape_n_or_n_1_equal_keras(epsilon, shape, dtype):
  """[N, 1] ids are ids (as for Keras), not a [N, C] soft label."""
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 3, (6, 4)).astype(np.float32)
  ids = rng.integers(0, 4, 6)
  loss = losses.CrossEntropy(epsilon)(ids.reshape(shape).astype(dtype),
                                      logits)
  if epsilon:
    expected = keras.losses.categorical_crossentropy(
        np.eye(4, dtype=np.float32)[ids], logits, from_logits=True,
        label_smoothing=epsilon)
  else:
    expected = keras.losses.sparse_categorical_crossentropy(
        ids.reshape(shape), logits, from_logits=True)
  np.testing.assert_allclose(float(loss), float(np.mean(expected)),
                             rtol=1e-5)
  np.testing.assert_allclose(float(loss), _numpy_loss(ids, logits, epsilon),
                             rtol=1e-5)


def test_bad_smoothing_is_named():
  with pytest.raises(ValueError, match='label_smoothing=1.5'):
    losses.CrossEntropy(1.5)


def test_accuracy_works_on_soft_labels_in_fit():
  """Soft labels in training, class ids in evaluation, one compiled model."""
  keras.utils.set_random_seed(0)
  inputs = keras.Input((4,))
  network = keras.Model(inputs, keras.layers.Dense(3, name='head')(inputs))
  model = classifier.Classifier(network)
  model.compile(optimizer=keras.optimizers.SGD(0.1),
                loss=losses.CrossEntropy(0.1),
                metrics=[keras.metrics.SparseCategoricalAccuracy(
                    name='accuracy')])
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 4)).astype(np.float32)
  ids = rng.integers(0, 3, 8)
  soft = (0.7 * np.eye(3)[ids] + 0.3 * np.eye(3)[(ids + 1) % 3]).astype(
      np.float32)
  logs = model.fit(x, soft, batch_size=8, epochs=1, verbose=0).history
  predicted = np.argmax(model.predict(x, verbose=0), axis=-1)
  results = model.evaluate(x, ids, batch_size=8, return_dict=True, verbose=0)
  np.testing.assert_allclose(results['accuracy'], np.mean(predicted == ids))
  assert 0 <= logs['accuracy'][0] <= 1
  np.testing.assert_array_equal(
      losses.hard_labels(tf.constant(soft), 2).numpy(), ids)
