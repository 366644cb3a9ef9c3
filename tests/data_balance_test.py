"""Tests of class weights and the class-balanced training stream."""

import keras
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from configs import default as default_lib
from keras_sft import errors
from keras_sft.data import balance
from keras_sft.data import batch_augment
from keras_sft.data import pipeline
from keras_sft.models import classifier
from keras_sft.models import losses
from keras_sft.training import train
from keras_sft.tune import space as space_lib

_SIDE = 8
_NUM_CLASSES = 3
_NAMES = ('cat', 'dog', 'owl')


def _config(**overrides):
  config = default_lib.get_config()
  for key, value in overrides.items():
    config[key] = value
  return config


# --- config checks -----------------------------------------------------------


@pytest.mark.parametrize('value', [None, 'balanced', {'cat': 2.0},
                                   {0: 2.0, 2: 0.5}])
def test_valid_class_weights_pass(value):
  balance.check_config(_config(class_weight=value))


@pytest.mark.parametrize('value, fragment', [
    ('inverse', "class_weight must be None, 'balanced'"),
    ({}, "class_weight must be None, 'balanced'"),
    ({'cat': 0.0}, 'finite number > 0'),
    ({'cat': float('inf')}, 'finite number > 0'),
    ({'cat': '2'}, 'finite number > 0'),
    # float32 sample weights: inf (an infinite loss) and 0.
    ({'cat': 1e300}, 'within float32'),
    ({'cat': 1e-300}, 'within float32'),
    # Python's negative indexing would weight the last class.
    ({-1: 2.0}, 'Class ids are >= 0'),
    ({0: 2.0, -3: 2.0}, 'Class ids are >= 0'),
])
def test_bad_class_weights_are_refused(value, fragment):
  with pytest.raises(errors.ConfigError, match=fragment):
    balance.check_config(_config(class_weight=value))


def test_mixed_key_types_are_refused():
  # A plain ConfigDict cannot even be printed with mixed keys; checked on
  # the value itself.
  config = ml_collections.ConfigDict({'sampling': 'shuffle'})
  config.class_weight = None
  config.class_weight = {0: 1.0}
  config.class_weight['cat'] = 2.0
  with pytest.raises(errors.ConfigError, match='not a mix'):
    balance.check_config(config)


def test_unknown_sampling_is_refused_naming_the_choices():
  with pytest.raises(errors.ConfigError, match='oversample'):
    train.check_config(_config(sampling='oversample'))


# --- class weights -----------------------------------------------------------


def test_balanced_weights_are_scikit_learn_formula():
  counts = np.array([60, 30, 10])
  weights = balance.class_weights('balanced', counts, _NAMES)
  # n_samples / (n_classes · count_c) = 100 / (3 · count_c).
  np.testing.assert_allclose(weights, [100 / 180, 100 / 90, 100 / 30])
  # The mean weight over the split is 1.
  np.testing.assert_allclose(np.sum(weights * counts) / counts.sum(), 1.0)


def test_balanced_weights_leave_out_absent_classes():
  weights = balance.class_weights('balanced', [30, 0, 10], _NAMES)
  # Two classes present: 40 / (2 · count_c); the absent class is never drawn.
  np.testing.assert_allclose(weights, [40 / 60, 0.0, 40 / 20])


@pytest.mark.parametrize('mapping', [{'owl': 4.0, 'cat': 0.5},
                                     {2: 4.0, 0: 0.5},
                                     {'2': 4.0, '0': 0.5}])
def test_mapping_by_name_id_or_json_id(mapping):
  weights = balance.class_weights(mapping, (), _NAMES)
  np.testing.assert_allclose(weights, [0.5, 1.0, 4.0])


@pytest.mark.parametrize('mapping, fragment', [({'fox': 2.0}, "'fox'"),
                                               ({3: 2.0}, 'class id 3')])
def test_mapping_naming_no_class_is_refused(mapping, fragment):
  with pytest.raises(errors.ConfigError, match=fragment):
    balance.class_weights(mapping, (), _NAMES)


def test_a_class_given_twice_by_name_and_json_id_is_refused():
  # _NAMES[0] is 'cat': one of the two weights would silently win.
  with pytest.raises(errors.ConfigError, match="'cat'.*twice"):
    balance.class_weights({'cat': 2.0, '0': 3.0}, (), _NAMES)


def test_an_id_that_is_another_class_s_name_is_refused():
  """Folder classes '10', '2', '3' (sorted as text): the id 2 is the class
  '3', but the stored JSON's key '2' would name the class '2'."""
  names = ('10', '2', '3')
  with pytest.raises(errors.ConfigError, match='ambiguous'):
    balance.class_weights({2: 4.0}, (), names)
  # By name it is unambiguous, before and after JSON.
  np.testing.assert_allclose(balance.class_weights({'2': 4.0}, (), names),
                             [1.0, 4.0, 1.0])


def test_sample_weights_of_hard_and_soft_labels():
  weights = np.array([0.5, 1.0, 4.0])
  hard = balance.sample_weights(tf.constant([2, 0, 1], tf.int64), weights)
  np.testing.assert_allclose(hard.numpy(), [4.0, 0.5, 1.0])
  soft = tf.constant([[0.7, 0.0, 0.3], [0.0, 1.0, 0.0]], tf.float32)
  mixed = balance.sample_weights(soft, weights)
  np.testing.assert_allclose(mixed.numpy(), [0.7 * 0.5 + 0.3 * 4.0, 1.0],
                             rtol=1e-6)


# --- the loss with class weights ----------------------------------------------


def _network():
  inputs = keras.Input((_SIDE, _SIDE, 3))
  x = keras.layers.Conv2D(4, 3, name='conv')(inputs)
  x = keras.layers.GlobalAveragePooling2D()(x)
  outputs = keras.layers.Dense(_NUM_CLASSES, name='head')(x)
  return keras.Model(inputs, outputs)


def _model(initial_weights=None):
  keras.utils.set_random_seed(1)
  model = classifier.Classifier(_network(), 0.0)
  model.compile(optimizer=keras.optimizers.SGD(0.1),
                loss=losses.CrossEntropy(),
                metrics=[keras.metrics.SparseCategoricalAccuracy(
                    name='accuracy')])
  model(np.zeros((1, _SIDE, _SIDE, 3), np.float32))
  if initial_weights is not None:
    model.set_weights(initial_weights)
  return model


def _log_softmax(logits):
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@pytest.mark.parametrize('soft', [False, True])
def test_weighted_loss_equals_hand_computation(soft):
  """ce = Σᵢ wᵢ·CEᵢ / N with wᵢ from 'balanced' weights of counts 6, 2, 2."""
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (8, _SIDE, _SIDE, 3)).astype(np.float32)
  labels = np.array([0, 0, 0, 1, 2, 0, 1, 2])
  # By hand: 10 / (3 · 6), 10 / (3 · 2), 10 / (3 · 2).
  class_weights = np.array([10 / 18, 10 / 6, 10 / 6])
  np.testing.assert_allclose(
      balance.class_weights('balanced', [6, 2, 2], _NAMES), class_weights)
  targets = np.eye(_NUM_CLASSES)[labels]
  if soft:  # MixUp-like rows: 0.6 own class + 0.4 the next example's.
    targets = 0.6 * targets + 0.4 * np.roll(targets, -1, axis=0)
  y = tf.constant(targets, tf.float32) if soft else tf.constant(labels)
  weights = balance.sample_weights(y, class_weights).numpy()
  np.testing.assert_allclose(weights, targets @ class_weights, rtol=1e-6)
  model = _model()
  logits = np.asarray(model.network(images, training=True))
  per_example = -np.sum(targets * _log_softmax(logits), axis=1)
  expected = np.sum(weights * per_example) / len(labels)
  logs = model.train_on_batch(images, y, sample_weight=weights,
                              return_dict=True)
  np.testing.assert_allclose(logs['ce'], expected, rtol=1e-5)
  # Not the unweighted mean: the test can fail.
  assert abs(expected - per_example.mean()) > 1e-3


def test_weighted_step_on_two_replicas_matches_one():
  rng = np.random.default_rng(3)
  images = rng.uniform(0, 1, (16, _SIDE, _SIDE, 3)).astype(np.float32)
  labels = rng.integers(0, _NUM_CLASSES, 16)
  weights = balance.sample_weights(tf.constant(labels),
                                   np.array([0.2, 1.0, 3.0])).numpy()
  dataset = tf.data.Dataset.from_tensor_slices(
      (images, labels, weights)).batch(8)
  initial = _model().get_weights()
  one = _model(initial)
  one.fit(dataset, epochs=1, shuffle=False, verbose=0)
  devices = [d.name for d in tf.config.list_logical_devices('CPU')[:2]]
  with tf.distribute.MirroredStrategy(devices).scope():
    two = _model(initial)
  two.fit(dataset, epochs=1, shuffle=False, verbose=0)
  for a, b in zip(one.get_weights(), two.get_weights()):
    np.testing.assert_allclose(a, b, atol=1e-6)


# --- the training stream -----------------------------------------------------


def _imbalanced(counts=(40, 8, 2)):
  """Examples whose image encodes (label, index): every pixel of the first
  channel is the label, of the second the index."""
  labels = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
  images = np.zeros((len(labels), _SIDE, _SIDE, 3), np.uint8)
  images[..., 0] = labels[:, None, None]
  images[..., 1] = np.arange(len(labels))[:, None, None]
  return tf.data.Dataset.from_tensor_slices((images, labels)), counts


def _stream(sampling='balanced', start_step=0, seed=0, class_weights=None,
            batch_augmenter=None, counts=(40, 8, 2)):
  examples, counts = _imbalanced(counts)
  return pipeline.make_train_dataset(
      examples, image_size=_SIDE, global_batch_size=10, seed=seed,
      shuffle_buffer_size=64, start_step=start_step, sampling=sampling,
      class_counts=counts, class_weights=class_weights,
      batch_augmenter=batch_augmenter, random_crop=False, random_flip=False)


def test_balanced_stream_is_uniform_over_classes_within_4_sigma():
  draws = 3000
  labels, images = [], []
  for batch_images, batch_labels in _stream().take(draws // 10):
    labels.append(batch_labels.numpy())
    images.append(batch_images.numpy())
  labels = np.concatenate(labels)
  images = np.concatenate(images)
  # Every image is one of its own class (the per-class streams read a shared
  # cache).
  np.testing.assert_array_equal(images[:, 0, 0, 0], labels)
  frequencies = np.bincount(labels, minlength=_NUM_CLASSES) / draws
  p = 1 / _NUM_CLASSES
  sigma = np.sqrt(p * (1 - p) / draws)
  assert np.all(np.abs(frequencies - p) < 4 * sigma), frequencies
  # The minority class (2 examples) repeats; the majority's 40 all appear.
  indices = images[:, 0, 0, 1]
  assert set(indices[labels == 0]) == set(range(40))
  assert set(indices[labels == 2]) == {48, 49}


def test_shuffle_stream_keeps_the_split_frequencies():
  labels = np.concatenate([labels.numpy() for _, labels in
                           _stream('shuffle').take(50)])
  np.testing.assert_array_equal(np.bincount(labels), [400, 80, 20])


@pytest.mark.parametrize('start_step', [1, 7])
def test_balanced_stream_resumes_exactly(start_step):
  full = [(i.numpy(), l.numpy()) for i, l in _stream().take(start_step + 3)]
  resumed = [(i.numpy(), l.numpy())
             for i, l in _stream(start_step=start_step).take(3)]
  for (want_images, want_labels), (images, labels) in zip(full[start_step:],
                                                          resumed):
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(images, want_images)


def test_balanced_stream_depends_on_the_seed():
  # The same seed gives the same stream: the resume test above.
  first = np.concatenate([l.numpy() for _, l in _stream(seed=1).take(5)])
  other = np.concatenate([l.numpy() for _, l in _stream(seed=2).take(5)])
  assert not np.array_equal(first, other)


def test_stream_with_class_weights_carries_them_after_mixing():
  weights = np.array([0.25, 1.0, 5.0])
  for _, labels, sample_weights in _stream('shuffle',
                                           class_weights=weights).take(3):
    np.testing.assert_allclose(sample_weights.numpy(),
                               weights[labels.numpy()])
  augmenter = batch_augment.create_batch_augmenter(_NUM_CLASSES,
                                                   mixup_alpha=0.4, seed=0)
  stream = _stream('shuffle', class_weights=weights,
                   batch_augmenter=augmenter)
  for _, labels, sample_weights in stream.take(3):
    assert labels.shape == (10, _NUM_CLASSES)
    np.testing.assert_allclose(sample_weights.numpy(),
                               labels.numpy() @ weights, rtol=1e-6)


# --- from the config, on tfds mock data -----------------------------------------


def test_tfds_counting_pass_counts_the_split(mock_cifar10):
  builder = pipeline.get_builder('cifar10')
  labels = [int(label) for _, label in builder.as_dataset(
      split='train', as_supervised=True, shuffle_files=False)]
  counts = balance.count_tfds_labels(builder, 'train', 10)
  np.testing.assert_array_equal(counts, np.bincount(labels, minlength=10))


def test_create_datasets_with_balanced_class_weight(mock_cifar10):
  train_data, _, info = pipeline.create_datasets(
      'cifar10', image_size=_SIDE, global_batch_size=8,
      class_weight='balanced', sampling='balanced')
  counts = np.array(info.train_class_counts)
  assert counts.sum() == info.num_train_examples
  present = counts > 0
  expected = np.zeros(10)
  expected[present] = counts.sum() / (present.sum() * counts[present])
  for _, labels, weights in train_data.take(2):
    np.testing.assert_allclose(weights.numpy(), expected[labels.numpy()],
                               rtol=1e-6)
    assert np.all(present[labels.numpy()])


def test_tfds_classes_are_not_counted_when_nothing_needs_them(mock_cifar10):
  _, _, info = pipeline.create_datasets('cifar10', image_size=_SIDE,
                                        global_batch_size=8)
  assert info.train_class_counts == ()


# --- the tuner -----------------------------------------------------------------


def test_tuner_space_can_search_both_keys():
  config = default_lib.get_config()
  raw = {'class_weight': {'choices': [None, 'balanced']},
         'sampling': {'choices': ['shuffle', 'balanced']}}
  space = space_lib.parse('space.py', raw, config)
  space_lib.validate(space, config, train.check_config)
  with pytest.raises(errors.ConfigError, match='oversample'):
    space_lib.validate(
        space_lib.parse('space.py', {'sampling': {'choices': [
            'shuffle', 'oversample']}}, config),
        config, train.check_config)


# --- the command line and the workdir ------------------------------------------


def _parsed(*overrides):
  """The config that `--config=configs/default.py OVERRIDES` gives."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ['main', '--config=configs/default.py', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_command_line_flags_parse_both_forms():
  config = _parsed("--config.class_weight={'cat': 2.0, 'dog': 0.5}",
                   '--config.sampling=balanced')
  assert dict(config.class_weight) == {'cat': 2.0, 'dog': 0.5}
  assert config.sampling == 'balanced'
  balance.check_config(config)
  assert _parsed('--config.class_weight=balanced').class_weight == 'balanced'


def test_a_rerun_with_a_class_id_mapping_claims_the_same_workdir(tmp_path):
  """JSON stores int keys as strings: the rerun must still match."""
  from keras_sft import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config = _config(class_weight={3: 2.0, 5: 0.5}, sampling='balanced')
  workdir = workdir_lib.Workdir(str(tmp_path / 'run'))
  workdir.claim(config)
  workdir.claim(_config(class_weight={3: 2.0, 5: 0.5}, sampling='balanced'))
  stored = workdir.read_config()
  assert stored['class_weight'] == {'3': 2.0, '5': 0.5}
  # Read back, the keys are digit strings, which name the same class ids.
  np.testing.assert_allclose(
      balance.class_weights(stored['class_weight'], (), [str(i) + 'x'
                                                        for i in range(6)]),
      [1, 1, 1, 2.0, 1, 0.5])
  with pytest.raises(errors.WorkdirError, match='class_weight'):
    workdir.claim(_config(class_weight={3: 3.0}, sampling='balanced'))


def test_create_datasets_refuses_a_bad_class_weight_before_reading(
    mock_cifar10):
  with pytest.raises(errors.ConfigError, match='finite number > 0'):
    pipeline.create_datasets('cifar10', image_size=_SIDE, global_batch_size=8,
                             class_weight={'cat': -1.0})
