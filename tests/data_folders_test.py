"""Tests of image folders (`folder:PATH`) on folders the tests write."""

import collections
import io
import logging
import os
import shutil
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import cifar10_resnet50
from keras_sft.data import folders
from keras_sft.data import images
from keras_sft.data import pipeline
from keras_sft import errors
from keras_sft.export import saved_model
from keras_sft.models import network as network_lib
from keras_sft.training import train

import image_fixtures

_SIDE = 32


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """A valid folder: `(root, {relative path: (label, expected RGB)})`."""
  root = str(tmp_path_factory.mktemp('images'))
  return root, image_fixtures.write_image_folder(root)


@pytest.fixture
def folder_copy(folder, tmp_path):
  """A private copy of the valid folder, for tests that break it."""
  root = str(tmp_path / 'images')
  shutil.copytree(folder[0], root)
  return root, folder[1]


@pytest.fixture
def no_model_built(monkeypatch):

  def refuse(*args, **kwargs):
    raise AssertionError('A model was built before the bad data was found.')

  monkeypatch.setattr(network_lib, 'build_network', refuse)


def _create(root, global_batch_size=4, **kwargs):
  return pipeline.create_datasets(
      f'folder:{root}', image_size=_SIDE,
      global_batch_size=global_batch_size, shuffle_buffer_size=16, **kwargs)


def _split_counts(written, split):
  counts = collections.Counter(label for path, (label, _) in written.items()
                               if path.startswith(split + '/'))
  return [counts[label] for label in range(len(image_fixtures.CLASSES))]


def _eval_labels(eval_data):
  return np.concatenate([labels.numpy() for _, labels in eval_data])


def test_class_names_and_counts(folder):
  root, written = folder
  _, eval_data, info = _create(root)
  assert info.class_names == ('cat', 'dog', 'owl')
  assert info.num_classes == 3
  assert info.num_train_examples == sum(_split_counts(written, 'train')) == 12
  assert info.num_eval_examples == sum(_split_counts(written, 'test')) == 6
  np.testing.assert_array_equal(
      np.bincount(_eval_labels(eval_data), minlength=3),
      _split_counts(written, 'test'))


def test_decoded_images_are_rgb_and_match_the_files(folder):
  """Grayscale is replicated to RGB, alpha dropped, PNG pixels exact."""
  root, written = folder
  _, split = folders.list_split(os.path.join(root, 'train'))
  examples = list(folders.to_dataset(split).as_numpy_iterator())
  assert len(examples) == len(split.paths)
  checked = 0
  for path, label, (image, decoded_label) in zip(split.paths, split.labels,
                                                 examples):
    relative = os.path.relpath(path, root).replace(os.sep, '/')
    want_label, want_pixels = written[relative]
    assert label == decoded_label == want_label, relative
    assert image.dtype == np.uint8 and image.ndim == 3, relative
    assert image.shape[-1] == 3, relative
    if want_pixels is not None:
      np.testing.assert_array_equal(image, want_pixels, err_msg=relative)
      checked += 1
    if 'gray' in relative:
      # Grayscale files, JPEG too, come out with three equal channels.
      np.testing.assert_array_equal(image[..., 0], image[..., 2])
  # cat x4, owl gray.png, rgba.png and one RGB png.
  assert checked == 7


def test_batches_of_mixed_sizes_are_float_rgb_at_image_size(folder):
  root, _ = folder
  train_data, eval_data, _ = _create(root)
  images, labels = next(iter(train_data))
  assert images.shape == (4, _SIDE, _SIDE, 3) and images.dtype == tf.float32
  assert labels.dtype == tf.int64
  eval_images = np.concatenate([x.numpy() for x, _ in eval_data])
  assert eval_images.shape == (6, _SIDE, _SIDE, 3)
  assert 0 <= eval_images.min() and eval_images.max() <= 255


def test_train_stream_is_seeded_and_resumable(folder):
  root, _ = folder
  first = [b[0].numpy() for b in _create(root, seed=3)[0].take(3)]
  again = [b[0].numpy() for b in _create(root, seed=3)[0].take(3)]
  resumed = [b[0].numpy() for b in _create(root, seed=3,
                                           start_step=1)[0].take(2)]
  for want, got in zip(first, again):
    np.testing.assert_array_equal(want, got)
  for want, got in zip(first[1:], resumed):
    np.testing.assert_array_equal(want, got)


def test_corrupt_files_are_named_before_a_model_is_built(folder_copy,
                                                         tmp_path,
                                                         no_model_built):
  root, _ = folder_copy
  corrupt = os.path.join(root, 'train', 'dog', 'broken.png')
  truncated = os.path.join(root, 'test', 'cat', 'half.jpg')
  image_fixtures.write_corrupt(corrupt)
  image_fixtures.write_truncated_jpeg(truncated)
  config = cifar10_resnet50.get_config('smoke')
  config.dataset = f'folder:{root}'
  config.global_batch_size = 4
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(error.value)
  # One error lists the bad files of every split, and only those.
  assert corrupt in message and truncated in message
  assert '2 of 20 image files' in message
  assert 'skip_corrupt_images' in message
  assert os.path.join(root, 'test', 'cat', '0.png') not in message


def _bmp_bytes():
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, 'BMP')
  return buffer.getvalue()


def test_a_bmp_named_jpg_is_refused_as_serving_refuses_it(folder_copy):
  """Training reads only what `serve_image_bytes` accepts: JPEG and PNG."""
  root, _ = folder_copy
  bmp = os.path.join(root, 'train', 'dog', 'bitmap.jpg')
  with open(bmp, 'wb') as file:
    file.write(_bmp_bytes())
  assert tf.io.decode_image(_bmp_bytes()).shape == (8, 8, 3)  # A real BMP.
  with pytest.raises(ValueError) as error:
    _create(root)
  message = str(error.value)
  assert bmp in message, message
  reason = f'{bmp} is not a JPEG or PNG image (it is a BMP image'
  assert reason in message, message
  # The export's signature says the same of the same bytes.
  export_dir = os.path.join(os.path.dirname(root), 'export')
  saved_model.export_saved_model(_tiny_model(), export_dir, 8, ['a', 'b', 'c'])
  with pytest.raises(tf.errors.InvalidArgumentError) as served:
    tf.saved_model.load(export_dir).signatures['serve_image_bytes'](
        image_bytes=tf.constant([_bmp_bytes()]))
  assert ('image_bytes[0] is not a JPEG or PNG image (it is a BMP image' in
          str(served.value)), str(served.value)


def _tiny_model():
  inputs = keras.Input((8, 8, 3))
  return keras.Model(inputs, keras.layers.Dense(3)(
      keras.layers.GlobalAveragePooling2D()(inputs)))


def test_images_over_max_image_pixels_are_refused_before_decoding(
    folder_copy):
  root, _ = folder_copy
  bomb = os.path.join(root, 'train', 'cat', 'bomb.png')
  with open(bomb, 'wb') as file:
    file.write(image_fixtures.png_bomb(16_000))
  assert os.path.getsize(bomb) < 300_000
  start = time.monotonic()
  with pytest.raises(ValueError) as error:
    _create(root)
  assert time.monotonic() - start < 30  # Decoding it alone takes ~10 s.
  message = str(error.value)
  assert f'{bomb} is 16000x16000 pixels' in message, message
  assert 'max_image_pixels=40000000' in message, message
  os.remove(bomb)
  # The limit is a setting: the 64x64 dog JPEGs are over 4000 pixels.
  with pytest.raises(ValueError, match=r'64x64 pixels.*max_image_pixels=4000'):
    _create(root, max_image_pixels=4000)
  _, _, info = _create(root, max_image_pixels=4096)
  assert info.num_train_examples == 12


def test_corrupt_files_skipped_and_counted_when_asked(folder_copy, caplog):
  root, written = folder_copy
  corrupt = os.path.join(root, 'train', 'dog', 'broken.jpg')
  image_fixtures.write_corrupt(corrupt)
  with caplog.at_level(logging.WARNING):
    _, _, info = _create(root, skip_corrupt_images=True)
  assert info.num_train_examples == sum(_split_counts(written, 'train'))
  assert corrupt in caplog.text and '1 of 19' in caplog.text


@pytest.mark.parametrize('train_split, eval_split, num_train, num_eval', [
    # 12 train images: 75% is 9 of them, the rest 3.
    ('train[:75%]', 'train[75%:]', 9, 3),
    ('train[:10]', 'train[10:]', 10, 2),
    ('train', 'test[:50%]', 12, 3),
])
def test_split_slicing_sizes(folder, train_split, eval_split, num_train,
                             num_eval):
  root, _ = folder
  _, train_files, eval_files = folders.find_splits(
      root, train_split, eval_split)
  assert (len(train_files), len(eval_files)) == (num_train, num_eval)
  if eval_split.startswith('train'):
    # Complementary slices: disjoint, together the whole split.
    assert not set(train_files.paths) & set(eval_files.paths)
    assert len(set(train_files.paths) | set(eval_files.paths)) == 12
  _, _, info = _create(root, train_split=train_split, eval_split=eval_split)
  assert (info.num_train_examples, info.num_eval_examples) == (num_train,
                                                               num_eval)


def test_validation_fraction_on_one_folder_holds_out_each_class(tmp_path):
  """PATH/<class>/* plus a fraction: a stratified held-out eval split."""
  root = str(tmp_path / 'images')
  image_fixtures.write_image_folder(root, counts={'all': 4})
  flat = os.path.join(root, 'all')
  _, train_files, eval_files = folders.find_splits(
      flat, validation_fraction=0.25)
  # round(0.25 * 4) = 1 image of each of the 3 classes.
  assert sorted(eval_files.labels) == [0, 1, 2]
  assert len(train_files) == 9
  assert not set(train_files.paths) & set(eval_files.paths)
  _, _, info = _create(flat, validation_fraction=0.25)
  assert (info.num_train_examples, info.num_eval_examples) == (9, 3)


def test_a_slice_that_leaves_a_class_without_images_says_so(folder):
  """Not "after skipping unreadable files": nothing was skipped."""
  root, _ = folder
  _, split = folders.list_split(os.path.join(root, 'train'))
  # The fixed order's first images: a prefix that misses some class.
  size = next(size for size in range(1, len(split))
              if set(split.labels[:size]) != {0, 1, 2})
  names = [image_fixtures.CLASSES[i]
           for i in sorted({0, 1, 2} - set(split.labels[:size]))]
  with pytest.raises(ValueError) as error:
    _create(root, train_split=f'train[:{size}]', global_batch_size=1)
  message = str(error.value)
  assert 'skipping' not in message, message
  assert f"'train[:{size}]'" in message and str(names) in message, message
  assert 'Widen the slice' in message, message


def test_a_validation_fraction_that_takes_a_whole_class_says_so(tmp_path):
  root = str(tmp_path / 'images')
  image_fixtures.write_image_folder(root, counts={'all': 4})
  flat = os.path.join(root, 'all')
  for name in os.listdir(os.path.join(flat, 'owl'))[1:]:
    os.remove(os.path.join(flat, 'owl', name))
  # round(0.6 * 1) = 1: owl's only image is held out (2 of 4 of the others).
  with pytest.raises(ValueError) as error:
    _create(flat, validation_fraction=0.6)
  message = str(error.value)
  assert 'skipping' not in message, message
  assert 'validation_fraction=0.6' in message, message
  assert "['owl']" in message, message
  assert 'lower validation_fraction' in message, message


def test_validation_fraction_with_tfds_points_to_slices():
  with pytest.raises(ValueError, match=r'train\[:90%\]'):
    pipeline.create_datasets('cifar10', image_size=32,
                             global_batch_size=4,
                             validation_fraction=0.1)


def test_empty_class_folder_is_named(folder_copy):
  root, _ = folder_copy
  empty = os.path.join(root, 'train', 'zebra')
  os.makedirs(empty)
  with open(os.path.join(empty, 'notes.txt'), 'w') as file:
    file.write('not an image')
  with pytest.raises(ValueError, match='zebra.*holds no images') as error:
    _create(root)
  assert empty in str(error.value)


def test_a_symlink_loop_is_named_not_followed(folder_copy):
  root, _ = folder_copy
  cat = os.path.join(root, 'train', 'cat')
  os.makedirs(os.path.join(cat, 'more'))
  loop = os.path.join(cat, 'more', 'again')
  os.symlink(cat, loop)
  with pytest.raises(ValueError) as error:
    _create(root)
  message = str(error.value)
  assert loop in message and 'symlink loop' in message, message
  # A symlink to a folder outside the class is followed.
  os.remove(loop)
  elsewhere = os.path.join(os.path.dirname(root), 'more_cats')
  shutil.copytree(os.path.join(root, 'test', 'cat'), elsewhere)
  os.symlink(elsewhere, loop)
  _, _, info = _create(root)
  assert info.num_train_examples == 12 + 2


def test_class_sets_that_differ_between_splits_are_named(folder_copy):
  root, _ = folder_copy
  os.rename(os.path.join(root, 'test', 'owl'),
            os.path.join(root, 'test', 'eagle'))
  with pytest.raises(ValueError) as error:
    _create(root)
  message = str(error.value)
  assert os.path.join(root, 'test') in message
  assert "missing ['owl']" in message and "unexpected ['eagle']" in message


def test_no_images_at_all_is_named(tmp_path):
  root = str(tmp_path / 'images')
  os.makedirs(os.path.join(root, 'train'))
  os.makedirs(os.path.join(root, 'test'))
  with pytest.raises(ValueError, match='No class folders') as error:
    _create(root)
  assert os.path.join(root, 'train') in str(error.value)


def test_missing_folder_and_missing_split_are_named(folder, tmp_path):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='does not exist') as error:
    _create(missing)
  assert missing in str(error.value)
  root, _ = folder
  with pytest.raises(FileNotFoundError, match='validation_fraction') as error:
    _create(os.path.join(root, 'train'))  # Class folders, no train/ inside.
  with pytest.raises(FileNotFoundError) as error:
    _create(root, eval_split='val')
  assert os.path.join(root, 'val') in str(error.value)


def test_parse_split_rejects_garbage():
  assert folders.parse_split('train[90%:]') == ('train', '90%', None)
  assert folders.parse_split('val') == ('val', None, None)
  with pytest.raises(ValueError, match='Cannot parse'):
    folders.parse_split('train[:90%')


@pytest.mark.parametrize('split', ['train[:1.2.3]', 'train[:2.5]',
                                   'train[..%:]', 'train[1.2.3%:]'])
def test_parse_split_rejects_bounds_that_are_no_numbers(split):
  # The pattern lets these through; int()/float() of them was a traceback.
  with pytest.raises(errors.DataError, match='Cannot parse'):
    folders.parse_split(split)


def test_parse_split_takes_fractional_percents_and_negative_indices():
  assert folders.parse_split('train[:2.5%]') == ('train', None, '2.5%')
  assert folders.parse_split('train[-100:]') == ('train', '-100', None)


def test_files_are_decoded_once_per_process_unless_they_change(folder_copy,
                                                               monkeypatch):
  root, _ = folder_copy
  calls = []
  real = images.find_unreadable
  monkeypatch.setattr(images, 'find_unreadable',
                      lambda paths, *args: calls.append(len(paths)) or
                      real(paths, *args))
  _create(root)
  _create(root, start_step=1)  # What a resumed run does.
  assert calls == [18]
  # Overwrite a file that was fine: its size changes, so it is checked again.
  image_fixtures.write_corrupt(os.path.join(root, 'test', 'cat', '0.png'))
  with pytest.raises(ValueError, match='0.png'):
    _create(root)
  assert calls == [18, 18]
