"""Tests of keras_sft.data.pipeline on mock tfds data and in-memory data."""

import os
import time

import numpy as np
import pytest
import requests
import tensorflow as tf
import tensorflow_datasets as tfds
import urllib3

from configs import default as default_lib
from keras_sft import errors
from keras_sft.data import augment
from keras_sft.data import pipeline

_SIDE = 32  # Side of the mock CIFAR-10 images and of the in-memory images.
_NUM_CLASSES = 10


def _raw_examples(num_examples=12, side=_SIDE, channels=3, seed=0):
  """Returns `(images, labels)` numpy arrays of random uint8 images."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_examples, side, side, channels),
                        dtype=np.uint8)
  labels = np.arange(num_examples, dtype=np.int64) % _NUM_CLASSES
  return images, labels


def _dataset(images, labels):
  return tf.data.Dataset.from_tensor_slices((images, labels))


def _take(dataset, num_batches):
  """Returns the first `num_batches` batches as numpy `(images, labels)`."""
  return [(images.numpy(), labels.numpy())
          for images, labels in dataset.take(num_batches)]


def _assert_same_batches(expected, actual):
  assert len(expected) == len(actual)
  for (want_images, want_labels), (got_images, got_labels) in zip(expected,
                                                                  actual):
    np.testing.assert_array_equal(got_labels, want_labels)
    np.testing.assert_array_equal(got_images, want_images)


def _create(image_size=_SIDE, global_batch_size=8, seed=0, start_step=0,
            **kwargs):
  return pipeline.create_datasets(
      'cifar10', image_size=image_size, global_batch_size=global_batch_size,
      seed=seed, shuffle_buffer_size=64, start_step=start_step, **kwargs)


def _raw_split(split):
  """Returns the mock split's `(images, labels)` in tfds order."""
  builder = pipeline.get_builder('cifar10')
  examples = builder.as_dataset(split=split, as_supervised=True,
                                shuffle_files=False)
  images, labels = zip(*[(image.numpy(), label.numpy())
                         for image, label in examples])
  return np.stack(images), np.stack(labels)


# --- create_datasets on mock CIFAR-10 ----------------------------------------


@pytest.mark.parametrize('image_size', [_SIDE, 48])
def test_create_datasets_shapes_dtypes_and_range(mock_cifar10, image_size):
  """Train and eval batches are float32 [B,S,S,3] in [0,255], int64 labels."""
  del mock_cifar10
  batch = 24
  train, evaluation, _ = _create(image_size=image_size,
                                 global_batch_size=batch)
  assert train.element_spec[0].shape.as_list() == [batch, image_size,
                                                   image_size, 3]
  for images, labels in _take(train, 3):
    assert images.dtype == np.float32
    assert images.shape == (batch, image_size, image_size, 3)
    assert labels.dtype == np.int64
    assert labels.shape == (batch,)
    assert images.min() >= 0.0 and images.max() <= 255.0
    assert set(labels.tolist()) <= set(range(_NUM_CLASSES))
  eval_batches = _take(evaluation, -1)
  sizes = [labels.shape[0] for _, labels in eval_batches]
  # The last, smaller batch is kept: every one of the 64 examples counts once.
  assert sum(sizes) == 64
  assert sizes == [batch] * (64 // batch) + [64 % batch]
  for images, labels in eval_batches:
    assert images.dtype == np.float32
    assert images.shape[1:] == (image_size, image_size, 3)
    assert labels.dtype == np.int64
    assert images.min() >= 0.0 and images.max() <= 255.0


def test_eval_equals_preprocess_for_eval_of_raw_images_in_order(mock_cifar10):
  """Eval is exactly preprocess_for_eval of the raw test split, in order."""
  del mock_cifar10
  image_size = 48
  _, evaluation, _ = _create(image_size=image_size, global_batch_size=24)
  raw_images, raw_labels = _raw_split('test')
  got_images = np.concatenate([images for images, _ in _take(evaluation, -1)])
  got_labels = np.concatenate([labels for _, labels in _take(evaluation, -1)])
  expected = np.stack([
      augment.preprocess_for_eval(image, image_size).numpy()
      for image in raw_images
  ])
  np.testing.assert_array_equal(got_labels, raw_labels)
  np.testing.assert_allclose(got_images, expected, rtol=0, atol=1e-4)


def test_create_datasets_same_seed_same_stream_other_seed_differs(
    mock_cifar10):
  """Two pipelines with one seed agree; another seed gives other batches."""
  del mock_cifar10
  first = _take(_create(seed=3)[0], 2)
  again = _take(_create(seed=3)[0], 2)
  other = _take(_create(seed=4)[0], 2)
  _assert_same_batches(first, again)
  assert not all(
      np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_create_datasets_start_step_resumes_the_stream(mock_cifar10):
  """start_step=k yields batches k, k+1, ... of the start_step=0 stream."""
  del mock_cifar10
  batch = 8
  steps_per_epoch = 64 // batch
  start = steps_per_epoch + 2  # Inside the second epoch.
  full = _take(_create(global_batch_size=batch, seed=5)[0], start + 3)
  resumed = _take(
      _create(global_batch_size=batch, seed=5, start_step=start)[0], 3)
  _assert_same_batches(full[start:], resumed)


def test_dataset_info(mock_cifar10):
  """DatasetInfo: 10 classes, 10 distinct names, the split sizes."""
  del mock_cifar10
  _, _, info = _create()
  assert isinstance(info, pipeline.DatasetInfo)
  assert info.num_classes == _NUM_CLASSES
  assert len(info.class_names) == _NUM_CLASSES
  assert len(set(info.class_names)) == _NUM_CLASSES
  assert all(isinstance(name, str) for name in info.class_names)
  label = pipeline.get_builder('cifar10').info.features['label']
  assert list(info.class_names) == list(label.names)
  assert info.num_train_examples == len(_raw_split('train')[1])
  assert info.num_eval_examples == len(_raw_split('test')[1])


@pytest.mark.parametrize('image_size,global_batch_size,bad', [
    (0, 8, 'image_size=0'),
    (-32, 8, 'image_size=-32'),
    (32, 0, 'global_batch_size=0'),
    (32, -4, 'global_batch_size=-4'),
])
def test_non_positive_sizes_raise(mock_cifar10, image_size, global_batch_size,
                                  bad):
  """A non-positive image_size or batch size is a ValueError naming it."""
  del mock_cifar10
  with pytest.raises(ValueError, match=bad):
    _create(image_size=image_size, global_batch_size=global_batch_size)


def test_split_smaller_than_one_batch_raises(mock_cifar10):
  """A train split with fewer examples than one global batch is refused."""
  del mock_cifar10
  num_train = len(_raw_split('train')[1])
  with pytest.raises(ValueError) as error:
    _create(global_batch_size=num_train + 1)
  message = str(error.value)
  assert f'global_batch_size={num_train + 1}' in message
  assert f'{num_train} examples' in message


def test_unknown_dataset_raises_value_error_naming_it(mock_cifar10):
  """An unknown tfds name is a ValueError that names it."""
  del mock_cifar10
  name = 'no_such_dataset_for_keras_sft'
  with pytest.raises(ValueError, match=name):
    pipeline.get_builder(name)
  with pytest.raises(ValueError, match=name):
    pipeline.create_datasets(name, image_size=8, global_batch_size=2)


def test_get_builder_offline_fails_fast_with_manual_download_help(
    tmp_path, monkeypatch):
  """A failed download is a DatasetUnavailableError within seconds.

  Every connection attempt fails below requests, so urllib3's retries (and
  their back-off) still run, as on an offline machine: with tfds' default of
  10 retries this takes minutes. The message must name the manual-download
  folder and the CIFAR-10 archive.
  """
  attempts = []

  def offline_create_connection(address, *args, **kwargs):
    del args, kwargs
    attempts.append(address)
    raise OSError(f'offline (test): no route to {address!r}')

  monkeypatch.setattr(urllib3.util.connection, 'create_connection',
                      offline_create_connection)
  started = time.monotonic()
  with pytest.raises(pipeline.DatasetUnavailableError) as error:
    pipeline.get_builder('cifar10', data_dir=str(tmp_path))
  elapsed = time.monotonic() - started
  assert attempts, 'The download was never attempted.'
  # One try plus the pipeline's few retries, not tfds' default of 10.
  retries = pipeline._DOWNLOAD_RETRIES  # pylint: disable=protected-access
  assert len(attempts) <= 1 + retries
  assert elapsed < 10.0, f'Took {elapsed:.1f}s to give up on the download.'
  assert isinstance(error.value.__cause__, Exception)
  message = str(error.value)
  assert 'downloads/manual' in message
  assert 'cifar-10-binary.tar.gz' in message
  assert str(tmp_path) in message


def test_get_builder_fails_when_requests_raises(tmp_path, monkeypatch):
  """A requests.ConnectionError from the download is reported the same way."""

  def offline_get(self, url, *args, **kwargs):
    del self, args, kwargs
    raise requests.ConnectionError(f'offline (test): {url}')

  monkeypatch.setattr(requests.Session, 'get', offline_get)
  with pytest.raises(pipeline.DatasetUnavailableError) as error:
    pipeline.get_builder('cifar10', data_dir=str(tmp_path))
  assert isinstance(error.value.__cause__, requests.ConnectionError)
  assert 'downloads/manual' in str(error.value)
  assert 'cifar-10-binary.tar.gz' in str(error.value)


# --- make_train_dataset / make_eval_dataset on in-memory data ----------------


def test_train_is_augmented_eval_is_not():
  """Train differs from eval preprocessing; eval is preprocess_for_eval."""
  images, labels = _raw_examples(num_examples=8)
  batch = 8
  # A shuffle buffer of 1 keeps the order, so train and eval line up.
  train = pipeline.make_train_dataset(
      _dataset(images, labels), image_size=_SIDE, global_batch_size=batch,
      shuffle_buffer_size=1)
  evaluation = pipeline.make_eval_dataset(
      _dataset(images, labels), image_size=_SIDE, global_batch_size=batch)
  (train_images, train_labels), = _take(train, 1)
  (eval_images, eval_labels), = _take(evaluation, -1)
  expected = np.stack([
      augment.preprocess_for_eval(image, _SIDE).numpy()
      for image in images
  ])
  np.testing.assert_allclose(eval_images, expected, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(eval_labels, labels)
  np.testing.assert_array_equal(train_labels, labels)
  unchanged = sum(
      np.array_equal(train_image, eval_image)
      for train_image, eval_image in zip(train_images, eval_images))
  assert unchanged < batch, 'No training image was augmented.'


def test_make_train_dataset_seeded():
  """Same seed gives identical batches, another seed different ones."""
  images, labels = _raw_examples()

  def first_batches(seed):
    return _take(
        pipeline.make_train_dataset(
            _dataset(images, labels), image_size=_SIDE, global_batch_size=4,
            seed=seed, shuffle_buffer_size=len(labels)), 3)

  _assert_same_batches(first_batches(7), first_batches(7))
  other = first_batches(8)
  assert not all(
      np.array_equal(a[0], b[0]) for a, b in zip(first_batches(7), other))


@pytest.mark.parametrize('start_step', [1, 3, 7])
def test_make_train_dataset_start_step(start_step):
  """start_step=k gives exactly batches k, k+1, ... across epoch ends."""
  images, labels = _raw_examples(num_examples=12)
  batch = 4  # 3 batches per epoch: the resumed streams cross epoch ends.

  def stream(start, num_batches):
    return _take(
        pipeline.make_train_dataset(
            _dataset(images, labels), image_size=_SIDE,
            global_batch_size=batch, seed=11, shuffle_buffer_size=12,
            start_step=start), num_batches)

  full = stream(0, start_step + 4)
  _assert_same_batches(full[start_step:], stream(start_step, 4))


def test_each_example_of_the_stream_gets_its_own_augmentation():
  """Copies of one image in one batch are cropped/flipped differently."""
  images, labels = _raw_examples(num_examples=1)
  batch = 8
  copies = np.repeat(images, batch, axis=0), np.repeat(labels, batch)
  (train_images, _), = _take(
      pipeline.make_train_dataset(
          _dataset(*copies), image_size=_SIDE, global_batch_size=batch,
          seed=0, shuffle_buffer_size=1), 1)
  distinct = {train_image.tobytes() for train_image in train_images}
  assert len(distinct) > 1


def test_train_epochs_see_every_example_once():
  """Each epoch of the infinite stream holds every example exactly once."""
  images, labels = _raw_examples(num_examples=12)
  labels = np.arange(12, dtype=np.int64)  # Unique ids.
  batch = 4
  batches = _take(
      pipeline.make_train_dataset(
          _dataset(images, labels), image_size=_SIDE, global_batch_size=batch,
          seed=2, shuffle_buffer_size=12), 9)
  epochs = np.concatenate([ids for _, ids in batches]).reshape(3, 12)
  for epoch in epochs:
    assert sorted(epoch.tolist()) == labels.tolist()
  assert not np.array_equal(epochs[0], epochs[1]), 'Not reshuffled per epoch.'


@pytest.mark.parametrize('channels', [1, 4])
@pytest.mark.parametrize('make', ['train', 'eval'])
def test_non_rgb_images_raise(channels, make):
  """Images with 1 or 4 channels fail with an error about RGB/channels."""
  images, labels = _raw_examples(num_examples=4, channels=channels)
  make_fn = {
      'train': pipeline.make_train_dataset,
      'eval': pipeline.make_eval_dataset,
  }[make]
  with pytest.raises((tf.errors.InvalidArgumentError, ValueError)) as error:
    # The check may fire when the pipeline is built or on the first element.
    _take(make_fn(_dataset(images, labels), image_size=_SIDE,
                  global_batch_size=2), 1)
  message = str(error.value)
  assert 'channels' in message or 'RGB' in message


def test_non_rgb_images_of_unknown_shape_raise_at_run_time():
  """The channel check also fires when shapes are only known at run time."""
  images, labels = _raw_examples(num_examples=4, channels=1)
  examples = tf.data.Dataset.from_generator(
      lambda: zip(images, labels),
      output_signature=(tf.TensorSpec([None, None, None], tf.uint8),
                        tf.TensorSpec([], tf.int64)))
  with pytest.raises(tf.errors.InvalidArgumentError, match='channels'):
    _take(pipeline.make_eval_dataset(examples, image_size=_SIDE,
                                     global_batch_size=2), 1)


# --- augment_for_training -----------------------------------------------------


def _crops(image, size):
  """Yields every `size` x `size` crop of `image` and its mirror image."""
  height, width = image.shape[:2]
  for top in range(height - size + 1):
    for left in range(width - size + 1):
      crop = image[top:top + size, left:left + size]
      yield crop
      yield crop[:, ::-1]


def _is_a_crop(output, source, atol):
  return any(
      np.allclose(output, crop, rtol=0, atol=atol)
      for crop in _crops(source, output.shape[0]))


def test_augment_native_size_is_a_padded_crop():
  """At image_size == side: a crop of the zero-padded image, maybe flipped."""
  image = _raw_examples(num_examples=1)[0][0]
  pad = _SIDE // 8  # 12.5% of the side on each edge.
  padded = np.pad(image.astype(np.float32), [(pad, pad), (pad, pad), (0, 0)])
  outputs = [
      augment.augment_for_training(
          image, _SIDE, tf.constant([0, i], tf.int64)).numpy()
      for i in range(4)
  ]
  for output in outputs:
    assert output.shape == (_SIDE, _SIDE, 3)
    assert output.dtype == np.float32
    assert _is_a_crop(output, padded, atol=0)
  assert any(not np.array_equal(outputs[0], output) for output in outputs[1:])


def test_augment_other_size_is_a_crop_of_the_resized_image():
  """At image_size=48 on 32px: a 48px crop of the image resized to 48/0.875."""
  image_size = 48
  image = _raw_examples(num_examples=1)[0][0]
  enlarged = int(round(image_size / 0.875))
  resized = tf.image.resize(tf.cast(image, tf.float32), [enlarged, enlarged],
                            antialias=True).numpy()
  output = augment.augment_for_training(
      image, image_size, tf.constant([1, 2], tf.int64)).numpy()
  assert output.shape == (image_size, image_size, 3)
  assert output.dtype == np.float32
  assert output.min() >= 0.0 and output.max() <= 255.0
  assert _is_a_crop(output, resized, atol=1e-3)


@pytest.mark.parametrize('image_size', [_SIDE, 48])
def test_augment_eager_equals_inside_dataset_map(image_size):
  """One seed gives the same augmentation eagerly and inside Dataset.map."""
  images, _ = _raw_examples(num_examples=4)
  seeds = np.array([[5, i] for i in range(len(images))], np.int64)
  eager = np.stack([
      augment.augment_for_training(image, image_size, seed).numpy()
      for image, seed in zip(images, seeds)
  ])
  mapped = np.stack(list(
      tf.data.Dataset.from_tensor_slices((images, seeds)).map(
          lambda image, seed: augment.augment_for_training(
              image, image_size, seed)).as_numpy_iterator()))
  assert mapped.shape == (len(images), image_size, image_size, 3)
  np.testing.assert_array_equal(mapped, eager)


def test_preprocess_for_eval_native_size_is_identity():
  """At image_size == side, eval preprocessing only casts to float32."""
  image = _raw_examples(num_examples=1)[0][0]
  output = augment.preprocess_for_eval(image, _SIDE).numpy()
  assert output.dtype == np.float32
  np.testing.assert_allclose(output, image.astype(np.float32), atol=1e-3)


def _square_side(image):
  """Side of the bright square drawn by `_image_with_square`, in pixels."""
  mask = image[..., 0] > 127
  return int(mask.any(axis=0).sum())


def _image_with_square(height, width, side):
  image = np.zeros((height, width, 3), np.uint8)
  top, left = (height - side) // 2, (width - side) // 2
  image[top:top + side, left:left + side] = 255
  return image


@pytest.mark.parametrize('height, width', [(224, 224), (300, 400)])
def test_eval_sees_objects_at_the_training_scale(height, width):
  """An object has the same size in eval (and serving) as in training crops.

  Training squashes the image to image_size / 0.875 and crops; eval must
  resize the same way and centre-crop, not resize the whole image to
  image_size (objects 12.5% smaller).
  """
  image_size = 64
  image = _image_with_square(height, width, side=112)
  train_sides = {
      _square_side(augment.augment_for_training(
          image, image_size, tf.constant([0, seed], tf.int64)).numpy())
      for seed in range(4)}
  eval_side = _square_side(
      augment.preprocess_for_eval(image, image_size).numpy())
  assert len(train_sides) == 1 and eval_side in train_sides, (train_sides,
                                                              eval_side)
  # Batches of images (the serving signature) give the same as one image.
  batch = augment.preprocess_for_eval(image[None], image_size).numpy()
  np.testing.assert_array_equal(
      batch[0], augment.preprocess_for_eval(image, image_size).numpy())


def test_eval_with_resize_size_follows_bit_hyperrule():
  """With resize_size (BiT-HyperRule), eval resizes to image_size directly."""
  image = _image_with_square(160, 160, side=80)
  output = augment.preprocess_for_eval(image, 128, resize_size=160)
  assert output.shape == (128, 128, 3)
  assert _square_side(output.numpy()) == 64


# --- What is cached: large images at the size the pipeline needs -------------


def _smooth_images(num_examples, height, width, seed=0):
  """Photo-like uint8 images: smooth gradients and blobs, no pixel noise."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  images = []
  for _ in range(num_examples):
    channels = [127 + 120 * np.sin(2 * np.pi * (rng.uniform(1, 4) * x +
                                                rng.uniform(1, 4) * y +
                                                rng.uniform()))
                for _ in range(3)]
    images.append(np.stack(channels, -1).round().astype(np.uint8))
  return np.stack(images)


def _cached_datasets(monkeypatch):
  """Records every dataset that is cached, as it is before `.cache()`."""
  cached = []
  real_cache = tf.data.Dataset.cache

  def cache(dataset, *args, **kwargs):
    cached.append(dataset)
    return real_cache(dataset, *args, **kwargs)

  monkeypatch.setattr(tf.data.Dataset, 'cache', cache)
  return cached


@pytest.mark.parametrize('resize_size', [None, 96])
def test_large_images_are_cached_at_the_size_training_needs(monkeypatch,
                                                            resize_size):
  """Eight 8000x8000 PNGs took 4.5 GB: cached at full resolution."""
  cached = _cached_datasets(monkeypatch)
  images = _smooth_images(2, 300, 450)
  labels = np.array([0, 1], np.int64)
  seed = 7
  train = pipeline.make_train_dataset(
      _dataset(images, labels), image_size=_SIDE, global_batch_size=2,
      seed=seed, shuffle_buffer_size=1, resize_size=resize_size)
  evaluation = pipeline.make_eval_dataset(
      _dataset(images, labels), image_size=_SIDE, global_batch_size=2)
  (train_images, _), = _take(train, 1)
  (eval_images, _), = _take(evaluation, 1)
  # Train resizes to image_size / 0.875 = 37 (or resize_size) before its
  # crop, eval to at most that; the cache keeps twice that as the short
  # side, the aspect ratio kept.
  assert len(cached) == 2
  for dataset, short_side in zip(cached, (2 * max(37, resize_size or 0),
                                          2 * 37)):
    shapes = [image.shape for image, _ in dataset.as_numpy_iterator()]
    assert shapes == [(short_side, round(short_side * 1.5), 3)] * 2, shapes
  # What comes out is what full-resolution images give, up to rounding.
  for i, image in enumerate(images):
    expected = augment.augment_for_training(
        image, _SIDE, tf.constant([seed, i], tf.int64), resize_size).numpy()
    assert np.abs(train_images[i] - expected).mean() < 1.0
    expected = augment.preprocess_for_eval(image, _SIDE).numpy()
    assert np.abs(eval_images[i] - expected).mean() < 1.0


def test_small_images_are_cached_unchanged(monkeypatch):
  cached = _cached_datasets(monkeypatch)
  images, labels = _raw_examples(num_examples=2, side=60)
  pipeline.make_eval_dataset(_dataset(images, labels), image_size=_SIDE,
                             global_batch_size=2)
  stored = np.stack([image for image, _ in cached[0].as_numpy_iterator()])
  np.testing.assert_array_equal(stored, images)


# --- random_crop / random_flip ------------------------------------------------


@pytest.mark.parametrize('image_size, resize_size', [(_SIDE, None), (48, None),
                                                     (48, 64)])
def test_augment_without_random_crop_is_the_eval_view_or_its_mirror(
    image_size, resize_size):
  """random_crop=False: the eval geometry; with random_flip, some mirrored."""
  image = _raw_examples(num_examples=1)[0][0]
  view = augment.preprocess_for_eval(image, image_size,
                                     resize_size).numpy()
  flipped = []
  for i in range(8):
    seed = tf.constant([3, i], tf.int64)
    unflipped = augment.augment_for_training(
        image, image_size, seed, resize_size, random_crop=False,
        random_flip=False).numpy()
    np.testing.assert_array_equal(unflipped, view)
    output = augment.augment_for_training(
        image, image_size, seed, resize_size, random_crop=False).numpy()
    if np.array_equal(output, view[:, ::-1]) and not np.array_equal(
        view, view[:, ::-1]):
      flipped.append(i)
    else:
      np.testing.assert_array_equal(output, view)
  assert 0 < len(flipped) < 8, flipped


def test_augment_without_random_flip_is_an_unmirrored_crop():
  """random_flip=False at image_size: every output is an unflipped crop."""
  image = _raw_examples(num_examples=1)[0][0]
  pad = _SIDE // 8
  padded = np.pad(image.astype(np.float32), [(pad, pad), (pad, pad), (0, 0)])
  crops = [crop for index, crop in enumerate(_crops(padded, _SIDE))
           if index % 2 == 0]  # _crops yields each crop, then its mirror.
  outputs = [
      augment.augment_for_training(
          image, _SIDE, tf.constant([0, i], tf.int64),
          random_flip=False).numpy() for i in range(6)
  ]
  for output in outputs:
    assert any(np.array_equal(output, crop) for crop in crops)
  assert any(not np.array_equal(outputs[0], output) for output in outputs[1:])


def test_training_stream_without_augmentation_equals_eval_images():
  """Both keys off: the training batches hold exactly the eval images."""
  images, labels = _raw_examples(num_examples=8)
  examples = tf.data.Dataset.from_tensor_slices((images, labels))
  batch_images, batch_labels = next(iter(pipeline.make_train_dataset(
      examples, image_size=_SIDE, global_batch_size=8, cache=False,
      random_crop=False, random_flip=False)))
  order = [int(np.flatnonzero(
      (images.reshape(8, -1) == image.numpy().reshape(1, -1)).all(axis=1))[0])
           for image in batch_images]
  assert sorted(order) == list(range(8))
  np.testing.assert_array_equal(batch_labels.numpy(), labels[order])


def test_an_appended_augmentation_keeps_the_seeds_of_the_others():
  """AUGMENTATIONS splits the example's seed once: more entries, same first
  seeds, so adding one leaves existing runs' augmentation unchanged."""
  seed = tf.constant([7, 123], tf.int64)
  two = tf.random.experimental.stateless_split(seed, num=2).numpy()
  three = tf.random.experimental.stateless_split(seed, num=3).numpy()
  np.testing.assert_array_equal(three[:2], two)


def test_every_augmentation_entry_has_a_config_key_and_can_be_switched_off():
  config = default_lib.get_config()
  image = tf.constant(np.arange(2 * _SIDE * _SIDE * 3).reshape(
      2 * _SIDE, _SIDE, 3) % 251, tf.uint8)
  seed = tf.constant([0, 5], tf.int64)
  off = {entry.key: False for entry in augment.AUGMENTATIONS}
  for entry in augment.AUGMENTATIONS:
    assert config[entry.key] is True, entry.key
  # All off: the eval view exactly.
  np.testing.assert_array_equal(
      augment.augment_for_training(image, _SIDE, seed, **off).numpy(),
      augment.preprocess_for_eval(image, _SIDE).numpy())
  with pytest.raises(ValueError, match='random_rotate'):
    augment.augment_for_training(image, _SIDE, seed, random_rotate=True)


def test_create_datasets_refuses_a_batch_augmentation_that_is_no_dict():
  with pytest.raises(errors.ConfigError, match=r'batch_augmentation=\[1\]'):
    pipeline.create_datasets('cifar10', image_size=32, global_batch_size=4,
                             batch_augmentation=[1])


@pytest.mark.parametrize('name', ['cifar10:9.9.9', 'cifar10/x', '123'])
def test_a_malformed_dataset_name_is_a_config_error(name):
  """The hostile pass: tfds' ValueError/AssertionError tracebacks."""
  with pytest.raises(errors.ConfigError, match='dataset='):
    pipeline.get_builder(name)


def test_split_dataset_of_a_tfds_split_is_its_eval_view_in_order(
    mock_cifar10):
  """The calibration split: preprocess_for_eval of the raw split, in order,
  with its size."""
  del mock_cifar10
  config = default_lib.get_config()
  config.image_size = _SIDE
  config.global_batch_size = 5
  dataset, count = pipeline.split_dataset(config, 'test', None)
  raw_images, raw_labels = _raw_split('test')
  assert count == len(raw_labels)
  got = list(_take(dataset, -1))
  np.testing.assert_array_equal(
      np.concatenate([labels for _, labels in got]), raw_labels)
  np.testing.assert_allclose(
      np.concatenate([images for images, _ in got]),
      np.stack([augment.preprocess_for_eval(image, _SIDE).numpy()
                for image in raw_images]), rtol=0, atol=1e-4)


def test_split_dataset_of_a_folder_reads_its_split_folder(tmp_path):
  import image_fixtures  # pylint: disable=g-import-not-at-top
  root = str(tmp_path)
  written = image_fixtures.write_image_folder(
      root, counts={'train': 2, 'val': 3})
  config = default_lib.get_config()
  config.dataset = f'folder:{root}'
  config.image_size = _SIDE
  config.global_batch_size = 4
  dataset, count = pipeline.split_dataset(config, 'val',
                                          image_fixtures.CLASSES)
  labels = np.concatenate([labels for _, labels in _take(dataset, -1)])
  val_labels = [label for path, (label, _) in written.items()
                if path.startswith('val/')]
  assert count == len(val_labels) == 9
  assert sorted(labels) == sorted(val_labels)
  # Slices count files of the split's fixed order, as train_split's do.
  _, count = pipeline.split_dataset(config, 'val[:7]', image_fixtures.CLASSES)
  assert count == 7
  with pytest.raises(errors.DataError, match='differ'):
    pipeline.split_dataset(config, 'val', ('cat', 'dog'))


@pytest.mark.parametrize('link', ['folder', 'file'])
def test_a_calibration_folder_linked_to_the_eval_split_is_refused(tmp_path,
                                                                  link):
  """`val -> test` (or a val/ of links to test/'s files) passes the config's
  check of the split names; the run's calibration would then be fitted on
  its eval images, silently."""
  import image_fixtures  # pylint: disable=g-import-not-at-top
  root = str(tmp_path)
  image_fixtures.write_image_folder(root, counts={'train': 2, 'test': 2})
  if link == 'folder':
    os.symlink(os.path.join(root, 'test'), os.path.join(root, 'val'))
  else:
    for name in image_fixtures.CLASSES:
      os.makedirs(os.path.join(root, 'val', name))
      first = sorted(os.listdir(os.path.join(root, 'test', name)))[0]
      os.symlink(os.path.join(root, 'test', name, first),
                 os.path.join(root, 'val', name, first))
  config = default_lib.get_config()
  config.dataset = f'folder:{root}'
  config.image_size = _SIDE
  config.global_batch_size = 4
  config.calibration_split = 'val'
  data = pipeline.from_config(config)
  with pytest.raises(errors.DataError, match='shares 3 of its'
                     if link == 'file' else 'shares 6 of its'):
    pipeline.split_dataset(config, 'val', data.info.class_names,
                           held_out_from=data.info.files)


def test_a_real_calibration_folder_beside_the_others_is_read(tmp_path):
  import image_fixtures  # pylint: disable=g-import-not-at-top
  root = str(tmp_path)
  image_fixtures.write_image_folder(root, counts={'train': 2, 'test': 2,
                                                  'val': 1})
  config = default_lib.get_config()
  config.dataset = f'folder:{root}'
  config.image_size = _SIDE
  config.global_batch_size = 4
  data = pipeline.from_config(config)
  _, count = pipeline.split_dataset(config, 'val', data.info.class_names,
                                    held_out_from=data.info.files)
  assert count == 3


def test_a_split_the_tfds_dataset_lacks_is_one_error_naming_its_splits(
    tmp_path):
  # Real tfds (its mock_data makes up any split): README suggests a
  # dataset's own `validation` split for calibration_split, and CIFAR-10
  # has none; tfds' ValueError was a traceback.
  from tensorflow_datasets import testing as tfds_testing  # pylint: disable=g-import-not-at-top

  class SupervisedDummyMnist(tfds_testing.DummyMnist):
    """tfds' offline test dataset (train and test), with supervised keys."""

    def _info(self):
      info = super()._info()
      return tfds.core.DatasetInfo(builder=self, features=info.features,
                                   supervised_keys=('image', 'label'))

  builder = SupervisedDummyMnist(data_dir=str(tmp_path))
  builder.download_and_prepare()
  with pytest.raises(errors.DataError,
                     match=r"'validation'.*\['test', 'train'\]"):
    pipeline._read_split(builder, 'validation', False, 0)  # pylint: disable=protected-access
  assert int(pipeline._read_split(  # pylint: disable=protected-access
      builder, 'train[:5]', False, 0).cardinality()) == 5
