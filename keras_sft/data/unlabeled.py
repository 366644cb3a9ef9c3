"""Unlabelled images for semi-supervised training: `config.unlabeled`.

`config.unlabeled` is None, `folder:PATH` (JPEG/PNG images anywhere under
PATH, no class folders needed), or a split string of the tfds dataset
`config.dataset` (e.g. `train[1000:]` next to `train_split='train[:1000]'`;
its labels are never read). Folder images go through the labelled folders'
decoder and checks (`folders.check_files`, `images.decode_image`): each file
is decoded once before training, an unreadable one is named (or skipped
with `skip_corrupt_images`), grayscale and RGBA become RGB, and images of
any size are resized by the pipeline as labelled ones are. A tfds split of
other than 3 channels is refused before training.

Before training, the unlabelled images are compared with the labelled train
and eval images by content (MD5 of the file bytes for folders, of the
decoded pixels for tfds): duplicates are counted and logged as a warning
(eval images among them leak test inputs, not labels, into training), and
an unlabelled set made only of labelled images is refused.

This module also owns the strong view's cutout (`cutout`); the stream of
weak and strong views is `pipeline.make_unlabeled_dataset`.
"""

import hashlib
import logging
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_sft.data import folders
from keras_sft import errors

METHODS = ('fixmatch', 'self_training')
# The keys of a training step's input dict when it carries unlabelled
# images (`pipeline.Data.train`; read by `models.fixmatch`).
LABELED = 'images'
WEAK = 'unlabeled_weak'
STRONG = 'unlabeled_strong'
# The largest μ: FixMatch uses 7; every step pushes (1 + 2μ)·B images.
MAX_RATIO = 64
# Grey, in the pipeline's [0, 255] range: the fill of a cutout square.
_CUTOUT_FILL = 127.5


def check_config(config):
  """Checks the semi-supervised keys; reads no data."""
  errors.check_choice('semi_supervised', config.semi_supervised, METHODS,
                      optional=True)
  unlabeled = config.unlabeled
  if unlabeled is not None and (not isinstance(unlabeled, str) or
                                not unlabeled.strip()):
    raise errors.ConfigError(
        'unlabeled must be None, folder:PATH or a tfds split string. '
        f'Received: unlabeled={unlabeled!r}')
  if (unlabeled is None) != (config.semi_supervised is None):
    raise errors.ConfigError(
        'unlabeled and semi_supervised go together: unlabelled images need '
        'a method, and a method needs unlabelled images. Received: '
        f'unlabeled={unlabeled!r}, semi_supervised='
        f'{config.semi_supervised!r}. Set both (e.g. '
        '--config.unlabeled=folder:PATH --config.semi_supervised=fixmatch) '
        'or neither.')
  # The FixMatch keys are checked even when it is off (as every key is):
  # a NaN there is a typo to name now, not when FixMatch is switched on.
  errors.check_integer('fixmatch_mu', config.fixmatch_mu, 1,
                       ' (unlabelled images per labelled image in a step)')
  errors.check_at_most('fixmatch_mu', config.fixmatch_mu, MAX_RATIO,
                       'push more than 129 images through the network per '
                       'labelled image (FixMatch uses 7)')
  check_threshold(config.fixmatch_threshold)
  errors.check_positive('fixmatch_unlabeled_weight',
                        config.fixmatch_unlabeled_weight)
  errors.check_fraction('fixmatch_cutout_fraction',
                        config.fixmatch_cutout_fraction, upper_inclusive=True)
  errors.check_integer('fixmatch_randaugment_num_ops',
                       config.fixmatch_randaugment_num_ops, 0)
  errors.check_fraction('fixmatch_randaugment_magnitude',
                        config.fixmatch_randaugment_magnitude,
                        upper_inclusive=True)
  if (config.semi_supervised == 'fixmatch' and
      config.gradient_accumulation_steps != 1):
    # The step splits every input by the labelled batch's rows; the
    # unlabelled views (μ times as many) would be cut wrongly.
    raise errors.ConfigError(
        'semi_supervised does not combine with gradient accumulation yet. '
        f'Received: semi_supervised={config.semi_supervised!r}, '
        f'gradient_accumulation_steps={config.gradient_accumulation_steps!r}'
        '. Use --config.gradient_accumulation_steps=1 (lower fixmatch_mu or '
        'global_batch_size to save memory).')


def check_threshold(threshold):
  """τ must be in (0, 1]."""
  if not (errors.is_number(threshold) and 0 < threshold <= 1):
    raise errors.ConfigError(
        'fixmatch_threshold must be in (0, 1] (a softmax confidence; '
        f'FixMatch uses 0.95). Received: fixmatch_threshold={threshold!r}')


def load(config, info, train_examples, eval_examples, get_builder):
  """Reads and checks `config.unlabeled`; `(images, count, names)`.

  Args:
    config: The run's ConfigDict.
    info: The labelled data's `pipeline.DatasetInfo` (its `files` for
      folders).
    train_examples: The labelled `(image, label)` train examples (hashed
      for tfds).
    eval_examples: The same, eval.
    get_builder: `(name, data_dir)` -> the tfds builder
      (`pipeline.get_builder`, passed in: the pipeline imports this module).

  Returns:
    A dataset of uint8 `[H, W, 3]` images (in a seeded order), their
    number, and the files they were read from in that order (a folder) or
    None (tfds).

  Raises:
    DataError: no images, a wrong channel count, every image a labelled one.
  """
  spec = config.unlabeled
  if folders.is_folder_dataset(spec):
    images, paths = _load_folder(spec, config.seed,
                                 config.skip_corrupt_images,
                                 config.max_image_pixels)
    check_duplicates(
        file_hashes(paths), file_hashes(info.files), spec)
    return images, len(paths), tuple(paths)
  if folders.is_folder_dataset(config.dataset):
    raise errors.ConfigError(
        f'unlabeled={spec!r} is a tfds split, but dataset='
        f'{config.dataset!r} is an image folder. Use '
        '--config.unlabeled=folder:PATH.')
  images, count = _load_tfds(get_builder(config.dataset, config.data_dir),
                             config.dataset, spec, config.seed)
  labeled = _pixel_hashes(train_examples.map(lambda image, label: image))
  labeled += _pixel_hashes(eval_examples.map(lambda image, label: image))
  check_duplicates(_pixel_hashes(images), labeled, spec)
  return images, count, None


def list_images(root):
  """Every JPEG/PNG under `root` (subfolders and symlinks followed), sorted.

  Raises:
    PathNotFoundError: `root` is not a folder.
    DataError: it holds no images, or a symlink loop.
  """
  if not os.path.isdir(root):
    raise errors.PathNotFoundError(
        f'Unlabelled image folder {root!r} does not exist. Give a folder '
        'that holds JPEG/PNG images (in any subfolders).')
  paths = []
  visited = {os.path.realpath(root)}
  for directory, dirs, names in os.walk(root, followlinks=True):
    dirs.sort()
    for name in dirs:
      real = os.path.realpath(os.path.join(directory, name))
      if real in visited:
        raise errors.DataError(
            f'{os.path.join(directory, name)!r} leads to {real!r}, a folder '
            f'already read under {root!r}: a symlink loop (or two links to '
            'one folder) would read its images again. Remove or fix it.')
      visited.add(real)
    paths.extend(os.path.join(directory, name) for name in sorted(names)
                 if os.path.splitext(name)[1].lower() in
                 folders.IMAGE_EXTENSIONS)
  if not paths:
    raise errors.DataError(
        f'The unlabelled folder {root!r} holds no images '
        f'({"/".join(folders.IMAGE_EXTENSIONS)}, in any subfolder). Add '
        'images or fix --config.unlabeled.')
  return sorted(paths)


def _load_folder(spec, seed, skip_corrupt_images, max_image_pixels):
  root = folders.folder_root(spec)
  paths = list_images(root)
  split = folders.FolderSplit(tuple(paths), (0,) * len(paths))
  (split,), skipped = folders.check_files(
      [split], root, skip_corrupt_images, max_image_pixels)
  logging.info('Unlabelled folder %s: %d images (%d unreadable files '
               'skipped).', root, len(split), skipped)
  # A seed of its own, so the file order differs from the labelled one's;
  # permuted here (as `to_dataset` would with that seed) so the returned
  # paths are in the stream's order: self-training's pseudo-labels name
  # images by their position in it.
  order = np.random.default_rng(seed + 1).permutation(len(split))
  paths = [split.paths[i] for i in order]
  examples = folders.to_dataset(
      folders.FolderSplit(tuple(paths), (0,) * len(paths)),
      max_pixels=max_image_pixels)
  return examples.map(lambda image, label: image), paths


def _load_tfds(builder, dataset, split, seed):
  features = builder.info.features
  channels = (features['image'].shape[-1] if 'image' in features.keys()
              else None)
  if channels != 3:
    raise errors.DataError(
        f'The tfds dataset {dataset!r} has images of {channels} channels; '
        'unlabelled images must be RGB (3 channels), as labelled ones. Write '
        'them as an image folder (grayscale is converted there) and use '
        '--config.unlabeled=folder:PATH.')
  try:
    examples = builder.as_dataset(
        split=split, shuffle_files=True,
        read_config=tfds.ReadConfig(
            shuffle_seed=seed + 1, try_autocache=False))
  except (ValueError, KeyError) as error:
    raise errors.ConfigError(
        f'unlabeled={split!r} is not a split of {dataset!r} ({error}). '
        "Give a split string such as 'train[1000:]', or folder:PATH.") from error
  count = int(examples.cardinality())
  if count <= 0:
    raise errors.DataError(f'The unlabelled split {split!r} of {dataset!r} '
                           'holds no examples.')
  return examples.map(lambda example: example['image']), count


def file_hashes(paths):
  """MD5 of each file's bytes (duplicates; self-training's labelled files)."""
  hashes = []
  for path in paths:
    with open(path, 'rb') as file:
      hashes.append(hashlib.md5(file.read()).hexdigest())
  return hashes


def _pixel_hashes(images):
  hashes = []
  for image in images.as_numpy_iterator():
    image = np.ascontiguousarray(image)
    hashes.append(hashlib.md5(
        str(image.shape).encode() + image.tobytes()).hexdigest())
  return hashes


def check_duplicates(unlabeled_hashes, labeled_hashes, spec):
  """Warns with the count of unlabelled images that are labelled ones.

  Returns:
    The number of such unlabelled images.

  Raises:
    DataError: all of them are.
  """
  labeled = set(labeled_hashes)
  duplicates = sum(1 for value in unlabeled_hashes if value in labeled)
  if duplicates and duplicates == len(unlabeled_hashes):
    raise errors.DataError(
        f'All {duplicates} images of unlabeled={spec!r} are labelled train '
        'or eval images (same content): semi-supervised training would '
        'learn nothing from them, and eval images would leak into training. '
        'Point --config.unlabeled at images without labels.')
  if duplicates:
    logging.warning(
        '%d of the %d images of unlabeled=%r are labelled train or eval '
        'images (same content); they are used as unlabelled images too. '
        'Eval images among them put test inputs (not labels) into '
        'training: remove them for an honest evaluation.', duplicates,
        len(unlabeled_hashes), spec)
  return duplicates


def cutout(images, seed, fraction):
  """Greys out one random square per image, side ≤ `fraction` × image side.

  The strong view's cutout (FixMatch applies it after RandAugment): per
  image, a side drawn uniformly in [1, round(fraction·side)] and a centre
  uniform over the image (the square is clipped at the edges), filled with
  grey 127.5.

  Args:
    images: float32 `[N, H, W, C]` in [0, 255].
    seed: `[2]` int seed of the stateless draws.
    fraction: In [0, 1]; 0 leaves the images unchanged.
  """
  if not fraction:
    return images
  shape = tf.shape(images)
  count, height, width = shape[0], shape[1], shape[2]
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
  largest = tf.maximum(tf.cast(tf.round(
      fraction * tf.cast(tf.minimum(height, width), tf.float32)), tf.int32),
                       1)
  side = tf.random.stateless_uniform([count], seeds[0], 1, largest + 1,
                                     tf.int32)
  center_y = tf.random.stateless_uniform([count], seeds[1], 0, height,
                                         tf.int32)
  center_x = tf.random.stateless_uniform([count], seeds[2], 0, width,
                                         tf.int32)
  top = (center_y - side // 2)[:, None, None]
  left = (center_x - side // 2)[:, None, None]
  side = side[:, None, None]
  rows = tf.range(height)[None, :, None]
  columns = tf.range(width)[None, None, :]
  inside = tf.logical_and(
      tf.logical_and(rows >= top, rows < top + side),
      tf.logical_and(columns >= left, columns < left + side))
  return tf.where(inside[..., None], tf.constant(_CUTOUT_FILL, images.dtype),
                  images)
