"""Tests of FixMatch's loss inside the Classifier's step, 1 and 2 replicas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import models_classifier_test

from keras_sft import errors
from keras_sft.models import classifier
from keras_sft.models import fixmatch

_LAMBDA = 0.05
_NUM_CLASSES = models_classifier_test._NUM_CLASSES  # pylint: disable=protected-access
# The classifier test's tiny network (conv, BN, head of _NUM_CLASSES).
_network = models_classifier_test._network  # pylint: disable=protected-access
_LEARNING_RATE = 0.1


def _model(kind='fixmatch', initial_weights=None, freeze_batchnorm=False,
           threshold=0.3, unlabeled_weight=2.0):
  keras.utils.set_random_seed(1)
  if kind == 'fixmatch':
    model = fixmatch.FixMatchClassifier(
        _network(freeze_batchnorm), threshold=threshold,
        unlabeled_weight=unlabeled_weight, weight_decay=_LAMBDA)
  else:
    model = classifier.Classifier(_network(freeze_batchnorm), _LAMBDA)
  model.compile(
      optimizer=keras.optimizers.SGD(_LEARNING_RATE),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=[keras.metrics.SparseCategoricalAccuracy(name='accuracy')])
  model(np.zeros((1, 8, 8, 3), np.float32))
  if initial_weights is not None:
    model.set_weights(initial_weights)
  return model


def _batch(seed=0, size=8, unlabeled=16):
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 255, (size, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, _NUM_CLASSES, size).astype(np.int64)
  inputs = {
      fixmatch.LABELED: images,
      fixmatch.WEAK: rng.uniform(0, 255, (unlabeled, 8, 8, 3)).astype(
          np.float32),
      fixmatch.STRONG: rng.uniform(0, 255, (unlabeled, 8, 8, 3)).astype(
          np.float32),
  }
  return inputs, labels


def _softmax(logits):
  exponentials = np.exp(logits - logits.max(-1, keepdims=True))
  return exponentials / exponentials.sum(-1, keepdims=True)


def test_unlabeled_loss_ignores_images_under_the_threshold():
  """Hand computation: only confident weak views count; divided by U."""
  weak = np.array([[4.0, 0.0, 0.0],    # p = 0.96 on class 0: kept
                   [0.0, 0.1, 0.0],    # p ≈ 0.36: under τ, ignored
                   [0.0, 0.0, 3.5],    # p ≈ 0.94 on class 2: kept
                   [1.0, 1.2, 0.9]],   # under τ, ignored
                  np.float32)
  strong = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  threshold = 0.9
  loss, mask = fixmatch.unlabeled_loss(weak, strong, threshold)

  confidence = _softmax(weak).max(-1)
  expected_mask = (confidence >= threshold).astype(np.float32)
  assert expected_mask.tolist() == [1.0, 0.0, 1.0, 0.0]
  pseudo = _softmax(weak).argmax(-1)
  cross_entropy = -np.log(_softmax(strong)[np.arange(4), pseudo])
  np.testing.assert_array_equal(mask.numpy(), expected_mask)
  # FixMatch divides by every unlabelled image (4), not by the 2 kept.
  np.testing.assert_allclose(float(loss),
                             (expected_mask * cross_entropy).sum() / 4,
                             rtol=1e-6)
  # The strong logits of the ignored images do not matter at all.
  changed = strong.copy()
  changed[[1, 3]] += 10.0
  np.testing.assert_allclose(
      float(fixmatch.unlabeled_loss(weak, changed, threshold)[0]),
      float(loss), rtol=1e-6)


def test_no_gradient_flows_through_the_weak_view(monkeypatch):
  """d loss / d (weak images) = 0, d loss / d (strong images) != 0.

  With hard pseudo-labels (argmax, threshold) the weak path has no
  differentiable route even without `tf.stop_gradient` (checked: removing
  it keeps the gradient zero); the stop-gradient guarantees it whatever
  the targets. A step that trained on the weak views (roles swapped) has a
  non-zero gradient there, so the test can fail.
  """
  model = _model(freeze_batchnorm=True, threshold=0.2)
  inputs, labels = _batch()

  def gradients():
    weak = tf.constant(inputs[fixmatch.WEAK])
    strong = tf.constant(inputs[fixmatch.STRONG])
    with tf.GradientTape() as tape:
      tape.watch([weak, strong])
      x = {fixmatch.LABELED: tf.constant(inputs[fixmatch.LABELED]),
           fixmatch.WEAK: weak, fixmatch.STRONG: strong}
      y_pred = model(x, training=True)
      total, _, _ = model._split_loss(x, labels, y_pred, None, training=True)
    return tape.gradient(total, [weak, strong])

  weak_gradient, strong_gradient = gradients()
  assert weak_gradient is None or not np.any(weak_gradient.numpy())
  assert np.any(strong_gradient.numpy())
  assert model.mask_rate_tracker.result() > 0  # Some pseudo-labels count.

  monkeypatch.setattr(fixmatch.tf, 'stop_gradient', lambda value: value)
  weak_gradient, _ = gradients()
  assert weak_gradient is None or not np.any(weak_gradient.numpy())

  original = fixmatch.unlabeled_loss
  monkeypatch.setattr(fixmatch, 'unlabeled_loss',
                      lambda weak, strong, threshold: original(
                          strong, weak, threshold))
  weak_gradient, _ = gradients()
  assert np.any(weak_gradient.numpy())


def test_one_step_follows_the_gradient_of_the_whole_loss():
  """w ← w − lr·∇(CE + λR + λ_u·U), U by hand from the network's logits."""
  initial = _model(freeze_batchnorm=True).get_weights()
  model = _model(initial_weights=initial, freeze_batchnorm=True)
  inputs, labels = _batch(seed=1)
  reference = _model(initial_weights=initial, freeze_batchnorm=True)
  network = reference.network
  # τ = the median confidence of the weak views: half of them count.
  confidence = _softmax(network(inputs[fixmatch.WEAK]).numpy()).max(-1)
  threshold = float(np.median(confidence))
  model.threshold = threshold
  with tf.GradientTape() as tape:
    logits = network(np.concatenate([inputs[fixmatch.LABELED],
                                     inputs[fixmatch.WEAK],
                                     inputs[fixmatch.STRONG]]), training=True)
    labeled, weak, strong = logits[:8], logits[8:24], logits[24:]
    probabilities = tf.nn.softmax(tf.stop_gradient(weak))
    mask = tf.cast(tf.reduce_max(probabilities, -1) >= threshold,
                   tf.float32)
    unlabeled = tf.reduce_sum(
        mask * keras.losses.sparse_categorical_crossentropy(
            tf.argmax(probabilities, -1), strong, from_logits=True)) / 16.0
    supervised = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
        labels, labeled, from_logits=True))
    decay = _LAMBDA * sum(tf.reduce_sum(tf.square(v))
                          for v in classifier.decayed_variables(network))
    total = supervised + decay + 2.0 * unlabeled
  variables = network.trainable_variables
  expected = [v.numpy() - _LEARNING_RATE * g.numpy()
              for v, g in zip(variables, tape.gradient(total, variables))]
  assert 0 < float(tf.reduce_mean(mask)) < 1  # Both kinds in the batch.

  logs = model.train_on_batch(inputs, labels, return_dict=True)

  for variable, value in zip(model.network.trainable_variables, expected):
    np.testing.assert_allclose(variable.numpy(), value, atol=1e-6,
                               err_msg=variable.path)
  np.testing.assert_allclose(logs[fixmatch.MASK_RATE],
                             float(tf.reduce_mean(mask)), rtol=1e-6)
  np.testing.assert_allclose(logs[fixmatch.UNLABELED_CE], float(unlabeled),
                             rtol=1e-5)
  # `loss` stays the supervised CE + λR, comparable with val_loss.
  np.testing.assert_allclose(logs['loss'], float(supervised + decay),
                             rtol=1e-5)


@pytest.mark.parametrize('freeze_batchnorm', [True, False])
def test_without_unlabeled_images_the_step_is_the_supervised_step(
    freeze_batchnorm):
  """μ = 0 (an empty unlabelled batch) or no unlabelled input: the same
  update as Classifier's, BN statistics included, to 1e-6."""
  initial = _model('supervised', freeze_batchnorm=freeze_batchnorm
                   ).get_weights()
  inputs, labels = _batch(seed=2, unlabeled=0)
  supervised = _model('supervised', initial, freeze_batchnorm)
  supervised.train_on_batch(inputs[fixmatch.LABELED], labels)
  empty = _model('fixmatch', initial, freeze_batchnorm)
  empty.train_on_batch(inputs, labels)
  plain = _model('fixmatch', initial, freeze_batchnorm)
  plain.train_on_batch(inputs[fixmatch.LABELED], labels)
  for other in (empty, plain):
    for expected, actual in zip(supervised.network.get_weights(),
                                other.network.get_weights()):
      np.testing.assert_allclose(actual, expected, atol=1e-6)


def _fit_three_steps(strategy, initial_weights):
  inputs, labels = _batch(seed=3, size=24, unlabeled=48)
  labeled = tf.data.Dataset.from_tensor_slices(
      (inputs[fixmatch.LABELED], labels)).batch(8)
  # 16 unlabelled images per 8 labelled ones (μ = 2), zipped.
  unlabeled = tf.data.Dataset.from_tensor_slices(
      (inputs[fixmatch.WEAK], inputs[fixmatch.STRONG])).batch(16)
  zipped = tf.data.Dataset.zip(labeled, unlabeled).map(
      lambda batch, views: ({fixmatch.LABELED: batch[0],
                             fixmatch.WEAK: views[0],
                             fixmatch.STRONG: views[1]}, batch[1]))
  with strategy.scope():
    model = _model(initial_weights=initial_weights, freeze_batchnorm=True)
  history = model.fit(zipped, epochs=1, shuffle=False, verbose=0)
  return model, history.history


def test_two_replicas_match_one_replica():
  """Each replica gets its share of both streams; the unlabelled term is
  scaled once: the same weights and metrics as one device."""
  initial = _model(freeze_batchnorm=True).get_weights()
  one = _fit_three_steps(tf.distribute.get_strategy(), initial)
  two = _fit_three_steps(tf.distribute.MirroredStrategy(
      ['/cpu:0', '/cpu:1'],
      cross_device_ops=tf.distribute.ReductionToOneDevice()), initial)
  for a, b in zip(one[0].get_weights(), two[0].get_weights()):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert 0 < one[1][fixmatch.MASK_RATE][0] < 1
  for key in ('loss', fixmatch.MASK_RATE, fixmatch.UNLABELED_CE):
    np.testing.assert_allclose(one[1][key], two[1][key], rtol=1e-5,
                               err_msg=key)


def test_evaluate_reports_no_unlabeled_metrics():
  model = _model()
  inputs, labels = _batch()
  results = model.evaluate(inputs[fixmatch.LABELED], labels, verbose=0,
                           return_dict=True)
  assert 'accuracy' in results and 'ce' in results
  assert fixmatch.MASK_RATE not in results
  assert fixmatch.UNLABELED_CE not in results


@pytest.mark.parametrize('threshold', [0, -0.1, 1.5, 'high', None])
def test_threshold_out_of_range_is_refused(threshold):
  with pytest.raises(errors.ConfigError, match='fixmatch_threshold'):
    fixmatch.FixMatchClassifier(_network(), threshold=threshold)


def test_keras_file_round_trip(tmp_path):
  model = _model(threshold=0.7, unlabeled_weight=3.0)
  path = str(tmp_path / 'model.keras')
  model.save(path)
  restored = keras.models.load_model(path)
  assert isinstance(restored, fixmatch.FixMatchClassifier)
  assert (restored.threshold, restored.unlabeled_weight) == (0.7, 3.0)
  images = _batch()[0][fixmatch.LABELED]
  np.testing.assert_allclose(restored.predict(images, verbose=0),
                             model.predict(images, verbose=0), atol=1e-6)
