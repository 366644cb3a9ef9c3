"""Tests of the unlabelled images: loading, checks, cutout, the resumable
stream of weak and strong views, zipped with the labelled one."""

import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import image_fixtures

from configs import cifar10_resnet50
from keras_sft.data import pipeline
from keras_sft.data import unlabeled
from keras_sft import errors

_SIDE = 16


def _config(root, unlabeled_root, **overrides):
  config = cifar10_resnet50.get_config('smoke')
  config.dataset = f'folder:{root}'
  config.image_size = _SIDE
  config.global_batch_size = 4
  config.unlabeled = f'folder:{unlabeled_root}'
  config.semi_supervised = 'fixmatch'
  config.fixmatch_mu = 2
  # One operation: RandAugment's graph is slow to build.
  config.fixmatch_randaugment_num_ops = 1
  for key, value in overrides.items():
    config[key] = value
  return config


def _write_unlabeled(root, count=5, seed=7):
  """PNGs in nested folders, no classes; plus a file that is not an image."""
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    path = os.path.join(root, f'part{i % 2}', 'deeper' if i % 3 else '',
                        f'{i}.png')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(path)
    paths.append(os.path.normpath(path))
  with open(os.path.join(root, 'notes.txt'), 'w') as file:
    file.write('not an image')
  return sorted(paths)


@pytest.fixture(name='folders')
def _folders(tmp_path):
  root = str(tmp_path / 'labelled')
  image_fixtures.write_image_folder(root)
  unlabeled_root = str(tmp_path / 'unlabelled')
  paths = _write_unlabeled(unlabeled_root)
  return root, unlabeled_root, paths


def test_list_images_finds_images_in_any_subfolder(folders):
  _, unlabeled_root, paths = folders
  assert unlabeled.list_images(unlabeled_root) == paths


def test_empty_folder_and_missing_folder_are_clear_errors(tmp_path):
  empty = tmp_path / 'empty'
  (empty / 'sub').mkdir(parents=True)
  (empty / 'sub' / 'readme.txt').write_text('no images here')
  with pytest.raises(errors.DataError, match='holds no images'):
    unlabeled.list_images(str(empty))
  with pytest.raises(errors.PathNotFoundError, match='does not exist'):
    unlabeled.list_images(str(tmp_path / 'missing'))


@pytest.mark.parametrize('overrides, match', [
    (dict(semi_supervised=None), 'go together'),
    (dict(unlabeled=None), 'go together'),
    (dict(semi_supervised='mixmatch'), 'semi_supervised'),
    (dict(fixmatch_mu=0), 'fixmatch_mu'),
    (dict(fixmatch_mu=65), 'fixmatch_mu'),
    (dict(fixmatch_threshold=0.0), r'fixmatch_threshold must be in \(0, 1\]'),
    (dict(fixmatch_threshold=1.01), 'fixmatch_threshold'),
    (dict(fixmatch_unlabeled_weight=0.0), 'fixmatch_unlabeled_weight'),
    (dict(fixmatch_cutout_fraction=1.5), 'fixmatch_cutout_fraction'),
    (dict(gradient_accumulation_steps=2), 'gradient accumulation'),
])
def test_bad_values_are_refused_before_reading_data(overrides, match):
  config = _config('/nonexistent', '/nonexistent', **overrides)
  with pytest.raises(errors.ConfigError, match=match):
    pipeline.check_config(config)


def test_defaults_are_off_and_pass():
  config = cifar10_resnet50.get_config('smoke')
  assert config.unlabeled is None and config.semi_supervised is None
  pipeline.check_config(config)


def test_duplicates_of_labelled_images_are_counted(folders, caplog):
  root, unlabeled_root, _ = folders
  for name in ('train/cat/0.png', 'test/dog/1.jpg'):
    shutil.copy(os.path.join(root, name),
                os.path.join(unlabeled_root, name.replace('/', '_')))
  with caplog.at_level(logging.WARNING):
    data = pipeline.from_config(_config(root, unlabeled_root))
  assert data.info.num_unlabeled_examples == 7
  assert '2 of the 7 images of unlabeled=' in caplog.text


def test_only_duplicates_are_refused(folders, tmp_path):
  root, _, _ = folders
  copies = str(tmp_path / 'copies')
  shutil.copytree(os.path.join(root, 'train'), copies)
  with pytest.raises(errors.DataError, match='All 12 images'):
    pipeline.from_config(_config(root, copies))


def test_corrupt_unlabelled_file_is_named_or_skipped(folders):
  root, unlabeled_root, _ = folders
  bad = os.path.join(unlabeled_root, 'part1', 'broken.png')
  image_fixtures.write_corrupt(bad)
  with pytest.raises(errors.DataError, match='broken.png'):
    pipeline.from_config(_config(root, unlabeled_root))
  data = pipeline.from_config(_config(root, unlabeled_root,
                                      skip_corrupt_images=True))
  assert data.info.num_unlabeled_examples == 5


def test_cutout_greys_one_square_per_image_within_the_bound():
  images = tf.random.uniform([6, 10, 12, 3], 200, 255, seed=1)
  out = unlabeled.cutout(images, tf.constant([3, 4], tf.int64), 0.5)
  for before, after in zip(images.numpy(), out.numpy()):
    changed = np.any(before != after, axis=-1)
    rows, columns = np.nonzero(changed)
    assert rows.size  # Every image gets its square (clipped at the edges).
    # One axis-aligned rectangle, all grey, sides <= round(0.5 * 10) = 5.
    assert changed[rows.min():rows.max() + 1,
                   columns.min():columns.max() + 1].all()
    assert rows.max() - rows.min() < 5 and columns.max() - columns.min() < 5
    np.testing.assert_array_equal(after[changed], 127.5)
    np.testing.assert_array_equal(after[~changed], before[~changed])
  np.testing.assert_array_equal(
      unlabeled.cutout(images, tf.constant([3, 4], tf.int64), 0.0), images)


def _stream(images, start_step, count=3, **options):
  # RandAugment off (slow to build): the zipped stream's test has it on.
  options = dict(dict(image_size=_SIDE, batch_size=4, seed=3,
                      shuffle_buffer_size=64, randaugment_num_ops=0),
                 **options)
  dataset = pipeline.make_unlabeled_dataset(images, start_step=start_step,
                                            **options)
  return [tuple(view.numpy() for view in pair)
          for pair in dataset.take(count)]


def _images(count=10):
  rng = np.random.default_rng(0)
  return tf.data.Dataset.from_tensor_slices(
      rng.integers(0, 256, (count, _SIDE, _SIDE, 3), np.uint8))


def test_unlabeled_stream_resumes_at_any_step():
  """Batches from step 2 on are those of an uninterrupted stream (the
  epoch of 10 images ends inside batch 2: the order is seeded per epoch)."""
  whole = _stream(_images(), 0, count=4)
  resumed = _stream(_images(), 2, count=2)
  for a, b in zip(whole[2:], resumed):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(whole[0][0], whole[1][0])


def test_weak_view_is_the_labelled_augmentation_strong_view_differs():
  weak, strong = _stream(_images(), 0, count=1)[0]
  assert weak.shape == strong.shape == (4, _SIDE, _SIDE, 3)
  assert not np.array_equal(weak, strong)
  # With cutout, crop and flip off, both views are the images themselves
  # (in the stream's order).
  weak, strong = _stream(_images(), 0, count=1, cutout_fraction=0.0,
                         random_crop=False, random_flip=False)[0]
  np.testing.assert_array_equal(weak, strong)
  originals = {image.tobytes() for image in
               np.asarray(list(_images().as_numpy_iterator()), np.float32)}
  assert all(image.tobytes() in originals for image in weak)


def test_training_batches_zip_both_streams_and_resume(folders):
  root, unlabeled_root, _ = folders
  data = pipeline.from_config(_config(root, unlabeled_root))
  batches = list(data.train(start_step=0).take(3).as_numpy_iterator())
  inputs, labels = batches[0]
  assert inputs[unlabeled.LABELED].shape == (4, _SIDE, _SIDE, 3)
  assert inputs[unlabeled.WEAK].shape == (8, _SIDE, _SIDE, 3)
  assert inputs[unlabeled.STRONG].shape == (8, _SIDE, _SIDE, 3)
  assert labels.shape == (4,)
  # Precise BN reads labelled batches only.
  plain = next(data.train(labeled_only=True).as_numpy_iterator())
  np.testing.assert_array_equal(plain[0], inputs[unlabeled.LABELED])
  resumed = next(data.train(start_step=2).as_numpy_iterator())
  for key in (unlabeled.LABELED, unlabeled.WEAK, unlabeled.STRONG):
    np.testing.assert_array_equal(resumed[0][key], batches[2][0][key])
  np.testing.assert_array_equal(resumed[1], batches[2][1])


def test_names_follow_the_images_in_their_seeded_order(folders):
  """Self-training names a pseudo-labelled image by its position in the
  stream and records its file: `unlabeled_names[i]` is image i's file."""
  root, unlabeled_root, paths = folders
  data = pipeline.from_config(_config(root, unlabeled_root))
  names = data.unlabeled_names
  assert sorted(names) == paths and list(names) != paths  # Shuffled.
  for name, image in zip(names, data.unlabeled_examples.as_numpy_iterator()):
    np.testing.assert_array_equal(image, np.asarray(Image.open(name)))


def test_tfds_split_is_hashed_by_pixels(mock_cifar10):
  """A split of the tfds dataset, its labels unread, compared by decoded
  pixels: tfds mock data gives every split the same images, all of them
  duplicates, so it is refused."""
  del mock_cifar10
  config = cifar10_resnet50.get_config('smoke')
  config.unlabeled = 'test'
  config.semi_supervised = 'fixmatch'
  with pytest.raises(errors.DataError, match="All 64 images of "
                     "unlabeled='test'"):
    pipeline.from_config(config)
