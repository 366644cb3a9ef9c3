"""Tests of MixUp/CutMix/RandAugment on batches: labels, determinism, resume."""

import logging

import numpy as np
import pytest
import tensorflow as tf

from keras_sft import errors
from keras_sft.data import batch_augment
from keras_sft.data import pipeline

_NUM_CLASSES = 4


def _batch(size=8, side=16, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (size, side, side, 3)).astype(np.float32)
  labels = rng.integers(0, _NUM_CLASSES, size).astype(np.int64)
  return tf.constant(images), tf.constant(labels)


@pytest.mark.parametrize('kind', ['mixup', 'cutmix', 'both'])
def test_mixed_labels_are_distributions_over_the_two_sources(kind):
  options = {'mixup_alpha': 0.4 if kind != 'cutmix' else 0.0,
             'cutmix_alpha': 1.0 if kind != 'mixup' else 0.0}
  augment = batch_augment.create_batch_augmenter(_NUM_CLASSES, seed=3,
                                                 **options)
  images, ids = _batch()
  mixed_any = False
  for index in range(4):
    out_images, labels = augment(tf.constant(index, tf.int64), images, ids)
    labels = labels.numpy()
    assert labels.shape == (8, _NUM_CLASSES)
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-6)
    assert (labels >= 0).all()
    # Each row puts its own class's weight at least on its own label.
    own = labels[np.arange(8), ids.numpy()]
    assert (own > 0).all()
    mixed_any |= bool((labels.max(axis=1) < 1 - 1e-6).any())
    assert out_images.shape == images.shape
  assert mixed_any, 'no label was ever mixed'


def test_mixup_images_follow_their_labels():
  """MixUp with one class per image: the label weight is the image weight."""
  augment = batch_augment.create_batch_augmenter(_NUM_CLASSES,
                                                 mixup_alpha=0.5, seed=0)
  images, _ = _batch(size=4)
  ids = tf.constant([0, 1, 2, 3], tf.int64)
  out, labels = augment(tf.constant(7, tf.int64), images, ids)
  # Image i = Σ_j labels[i, j] · image j (labels[:, j] weights source j).
  expected = np.einsum('ij,jhwc->ihwc', labels.numpy(), images.numpy())
  np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-2)


def test_same_batch_index_same_augmentation_different_index_differs():
  augment = batch_augment.create_batch_augmenter(
      _NUM_CLASSES, mixup_alpha=0.2, cutmix_alpha=1.0, randaugment_num_ops=2,
      randaugment_magnitude=0.5, seed=1)
  images, ids = _batch()
  first = augment(tf.constant(5, tf.int64), images, ids)
  again = augment(tf.constant(5, tf.int64), images, ids)
  other = augment(tf.constant(6, tf.int64), images, ids)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert not np.array_equal(first[0].numpy(), other[0].numpy())


def test_randaugment_alone_keeps_class_ids_and_changes_images():
  augment = batch_augment.create_batch_augmenter(
      _NUM_CLASSES, randaugment_num_ops=2, randaugment_magnitude=0.9, seed=0)
  images, ids = _batch()
  changed = False
  for index in range(3):
    out, labels = augment(tf.constant(index, tf.int64), images, ids)
    np.testing.assert_array_equal(labels.numpy(), ids.numpy())
    changed |= not np.allclose(out.numpy(), images.numpy())
  assert changed


def test_all_off_is_none_and_bad_values_are_named():
  assert batch_augment.create_batch_augmenter(_NUM_CLASSES) is None
  with pytest.raises(ValueError, match='cutmix_alpha=1.5'):
    batch_augment.create_batch_augmenter(_NUM_CLASSES, cutmix_alpha=1.5)
  with pytest.raises(ValueError, match='randaugment_magnitude=2'):
    batch_augment.create_batch_augmenter(
        _NUM_CLASSES, randaugment_num_ops=1, randaugment_magnitude=2)


def _stream(start_step):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (32, 16, 16, 3)).astype(np.uint8)
  labels = rng.integers(0, _NUM_CLASSES, 32).astype(np.int64)
  examples = tf.data.Dataset.from_tensor_slices((images, labels))
  augment = batch_augment.create_batch_augmenter(
      _NUM_CLASSES, mixup_alpha=0.2, cutmix_alpha=1.0, randaugment_num_ops=1,
      randaugment_magnitude=0.5, seed=2)
  return pipeline.make_train_dataset(
      examples, image_size=16, global_batch_size=8, seed=2,
      shuffle_buffer_size=32, start_step=start_step, batch_augmenter=augment)


def test_resumed_stream_sees_the_same_augmented_batches():
  """Batches 3..5 of a fresh stream equal batches 0..2 after start_step=3."""
  fresh = [tuple(t.numpy() for t in b) for b in _stream(0).take(6)]
  resumed = [tuple(t.numpy() for t in b) for b in _stream(3).take(3)]
  for (a_images, a_labels), (b_images, b_labels) in zip(fresh[3:], resumed):
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
  assert fresh[0][1].shape == (8, _NUM_CLASSES)


def test_every_entry_has_its_own_stream_and_config_keys():
  """Streams are never shared (a new entry leaves the others' randomness
  as it was) and every key is one of the default config's."""
  from keras_sft import default_config  # pylint: disable=g-import-not-at-top
  config = default_config.get_config()
  streams = [entry.stream for entry in batch_augment.BATCH_AUGMENTATIONS]
  assert len(set(streams)) == len(streams)
  assert batch_augment._CHOICE_STREAM not in streams  # pylint: disable=protected-access
  for entry in batch_augment.BATCH_AUGMENTATIONS:
    for key, off in entry.keys.items():
      assert config[key] == off, key  # Off by default.
  with pytest.raises(errors.ConfigError, match='mixup_aplha'):
    batch_augment.create_batch_augmenter(_NUM_CLASSES, mixup_aplha=0.2)


def _erasing(probability=1.0, seed=0):
  return batch_augment.create_batch_augmenter(
      _NUM_CLASSES, random_erasing_probability=probability, seed=seed)


def test_random_erasing_off_is_none_and_bad_probability_is_named():
  assert _erasing(0.0) is None
  with pytest.raises(errors.ConfigError,
                     match='random_erasing_probability=1.5'):
    _erasing(1.5)


def test_random_erasing_replaces_one_rectangle_per_image_in_range():
  augment = _erasing(1.0)
  images, ids = _batch(size=16)
  out, labels = augment(tf.constant(4, tf.int64), images, ids)
  assert out.shape == images.shape and out.dtype == tf.float32
  np.testing.assert_array_equal(labels.numpy(), ids.numpy())
  out = out.numpy()
  assert out.min() >= 0 and out.max() <= 255
  for image, original in zip(out, images.numpy()):
    changed = np.any(image != original, axis=-1)
    assert changed.any()
    rows, columns = np.flatnonzero(changed.any(1)), np.flatnonzero(
        changed.any(0))
    # The changed pixels fill one rectangle (a pixel of it rarely keeps
    # all three values), whose sides are at most √0.33 of the image's
    # (Keras' scale=(0.02, 0.33) per side, square-rooted), plus rounding.
    box = changed[rows.min():rows.max() + 1, columns.min():columns.max() + 1]
    assert box.mean() > 0.9
    assert max(box.shape) <= np.ceil(np.sqrt(0.33) * 16) + 1


def test_random_erasing_is_per_seed_and_step():
  images, ids = _batch()
  first = _erasing(seed=1)(tf.constant(5, tf.int64), images, ids)[0]
  again = _erasing(seed=1)(tf.constant(5, tf.int64), images, ids)[0]
  other_step = _erasing(seed=1)(tf.constant(6, tf.int64), images, ids)[0]
  other_seed = _erasing(seed=2)(tf.constant(5, tf.int64), images, ids)[0]
  np.testing.assert_array_equal(first.numpy(), again.numpy())
  assert not np.array_equal(first.numpy(), other_step.numpy())
  assert not np.array_equal(first.numpy(), other_seed.numpy())


def test_random_erasing_erases_each_image_with_its_probability():
  probability, draws = 0.3, 0
  erased = 0
  augment = _erasing(probability)
  images, ids = _batch(size=64)
  for index in range(10):
    out = augment(tf.constant(index, tf.int64), images, ids)[0].numpy()
    erased += int(np.sum(np.any(out != images.numpy(), axis=(1, 2, 3))))
    draws += 64
  sigma = np.sqrt(probability * (1 - probability) / draws)
  assert abs(erased / draws - probability) < 4 * sigma, erased / draws


def test_resumed_stream_with_random_erasing_sees_the_same_batches():
  rng = np.random.default_rng(0)
  examples = tf.data.Dataset.from_tensor_slices(
      (rng.integers(0, 256, (32, 16, 16, 3)).astype(np.uint8),
       rng.integers(0, _NUM_CLASSES, 32).astype(np.int64)))

  def stream(start_step):
    return pipeline.make_train_dataset(
        examples, image_size=16, global_batch_size=8, seed=2,
        shuffle_buffer_size=32, start_step=start_step,
        batch_augmenter=_erasing(0.5, seed=2))

  fresh = [b[0].numpy() for b in stream(0).take(5)]
  resumed = [b[0].numpy() for b in stream(3).take(2)]
  for want, got in zip(fresh[3:], resumed):
    np.testing.assert_array_equal(want, got)


def test_randaugment_without_magnitude_is_named_in_a_warning(caplog):
  """Hostile pass: randaugment_num_ops=2 with the default magnitude 0 (or
  a student's self_training_randaugment_magnitude=0) trained without
  RandAugment and said nothing."""
  with caplog.at_level(logging.WARNING):
    augmenter = batch_augment.create_batch_augmenter(
        3, randaugment_num_ops=2, randaugment_magnitude=0.0)
  assert augmenter is None
  assert 'randaugment_num_ops=2 with randaugment_magnitude=0.0' in caplog.text
  assert 'self_training_randaugment_magnitude' in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    batch_augment.create_batch_augmenter(
        3, randaugment_num_ops=2, randaugment_magnitude=0.5)
    batch_augment.create_batch_augmenter(3)
  assert 'applies no RandAugment' not in caplog.text
