"""tf.data input pipelines over tensorflow-datasets splits and image folders.

`create_datasets` reads a tfds dataset by name, or an image folder given as
`folder:PATH` (see `keras_sft.data.folders`); both become `(image uint8
[H, W, 3], label int64)` examples that `make_train_dataset` and
`make_eval_dataset` turn into batches.

Images leave the pipeline as float32 RGB in [0, 255], shape
`[batch, image_size, image_size, 3]`; labels as int64 `[batch]`. The model
applies its backbone's own preprocessing (`backbones.Preprocessing`), so the
pipeline never normalizes.

The training stream is deterministic for a given seed: the shuffle order is
seeded and every random augmentation is a stateless op seeded by
`(seed, index of the example in the stream)`. That is what lets a resumed run
skip exactly the examples it has already trained on (`start_step`) and see the
same batches as a run that was never interrupted.

Both pipelines keep a deterministic order on purpose, although tf.data could
trade it for throughput: a resumed run must skip exactly the batches it has
seen, and multi-worker DATA sharding (`_shard_by_data`) needs every worker to
see the same order to split it. Throughput comes instead from the parallel
map, caching decoded images, and prefetching (`benchmarks/run.py` measures
the pipeline against the training step; README "Performance").
"""

import contextlib
import dataclasses
import functools
import logging

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader as tfds_downloader

from keras_sft.data import augment
from keras_sft.data import balance
from keras_sft.data import batch_augment
from keras_sft.data import folders
from keras_sft.data import images
from keras_sft.data import unlabeled
from keras_sft import errors

# Epochs with distinct shuffle orders before the orders repeat.
_DISTINCT_EPOCH_ORDERS = 16
# Separates the shuffle seeds of different `seed`s: seed * stride + epoch.
_SEED_STRIDE = 1_000_003
# The random stream that mixes pseudo-labelled images into the labelled
# ones (`_with_pseudo_labels`), beside the seed's other uses.
_PSEUDO_LABEL_MIX_STREAM = 7
# HTTP retries of a tfds download (tfds' own default retries for minutes).
_DOWNLOAD_RETRIES = 2
# The largest side (image_size, resize_size) of an image the pipeline makes.
# At larger sides one training image's activations alone outgrow any
# accelerator's memory; a typo (image_size=100000000) would otherwise first
# fail while building the model, after the workdir is claimed.
MAX_IMAGE_SIZE = 4096
# The largest global batch: the largest published ImageNet batches (TPU pods)
# are this size.
MAX_GLOBAL_BATCH_SIZE = 65_536
# tf.data allocates the whole shuffle buffer when the stream starts, before
# any element arrives, and a buffer larger than the train split shuffles no
# better; a huge value ends the process when training starts.
MAX_SHUFFLE_BUFFER_SIZE = 10_000_000


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the rest of the code needs to know about a dataset.

  Attributes:
    num_classes: Number of label classes.
    class_names: One name per class id.
    num_train_examples: Examples in the train split.
    num_eval_examples: Examples in the eval split.
    files: For an image folder, the files its splits read (see
      `folders.load`); empty for tfds datasets.
    train_class_counts: Train examples per class: always for a folder
      (from its file lists), for tfds only when asked (a counting pass);
      else empty.
    num_unlabeled_examples: Images of `config.unlabeled` (0: none).
  """
  num_classes: int
  class_names: tuple
  num_train_examples: int
  num_eval_examples: int
  files: tuple = dataclasses.field(default=(), repr=False)
  train_class_counts: tuple = ()
  num_unlabeled_examples: int = 0


class DatasetUnavailableError(errors.UnavailableError):
  """The dataset is neither prepared locally nor downloadable."""


_TOO_LARGE_TO_TRAIN = ('need more memory than a machine has to train on '
                       'one batch')


def check_config(config):
  """Checks the data keys of the config; reads no data."""
  if not isinstance(config.dataset, str) or not config.dataset.strip():
    raise errors.ConfigError('dataset must be a tfds name or folder:PATH. '
                             f'Received: dataset={config.dataset!r}')
  errors.check_positive('image_size', config.image_size)
  errors.check_at_most('image_size', config.image_size, MAX_IMAGE_SIZE,
                       _TOO_LARGE_TO_TRAIN)
  errors.check_positive('global_batch_size', config.global_batch_size)
  errors.check_at_most('global_batch_size', config.global_batch_size,
                       MAX_GLOBAL_BATCH_SIZE,
                       'exceed the largest published ImageNet batches (TPU '
                       'pods) and the memory of any machine')
  errors.check_positive('shuffle_buffer_size', config.shuffle_buffer_size)
  errors.check_at_most(
      'shuffle_buffer_size', config.shuffle_buffer_size,
      MAX_SHUFFLE_BUFFER_SIZE,
      'are allocated at once when training starts (tf.data reserves the '
      'whole buffer), and a buffer larger than the train split shuffles no '
      'better')
  errors.check_fraction('validation_fraction', config.validation_fraction)
  errors.check_positive('resize_size', config.resize_size, optional=True)
  errors.check_at_most('resize_size', config.resize_size, MAX_IMAGE_SIZE,
                       _TOO_LARGE_TO_TRAIN)
  if config.resize_size is not None and config.resize_size < config.image_size:
    raise errors.ConfigError(
        'resize_size must be None or >= image_size. Received: '
        f'resize_size={config.resize_size!r}, image_size={config.image_size!r}')
  unlabeled.check_config(config)
  if config.semi_supervised is not None:
    errors.check_at_most(
        'fixmatch_mu * global_batch_size',
        config.fixmatch_mu * config.global_batch_size, MAX_GLOBAL_BATCH_SIZE,
        'exceed the largest published ImageNet batches and the memory of '
        'any machine (every step pushes 2μ·B unlabelled images)')


@dataclasses.dataclass(frozen=True)
class Data:
  """A run's datasets: the training stream can restart at any step.

  Attributes:
    info: The `DatasetInfo`.
    eval: The finite eval dataset of batches.
    train_examples: Decoded `(image, label)` training examples.
    train_options: Keyword arguments of `make_train_dataset`.
    unlabeled_examples: None, or decoded unlabelled images.
    unlabeled_options: Keyword arguments of `make_unlabeled_dataset`
      (FixMatch's stream), or None: `train` yields labelled batches only.
    unlabeled_names: The files of `unlabeled_examples` in their order (a
      folder), or None.
  """
  info: 'DatasetInfo'
  eval: tf.data.Dataset
  train_examples: tf.data.Dataset
  train_options: dict
  unlabeled_examples: tf.data.Dataset = None
  unlabeled_options: dict = None
  unlabeled_names: tuple = None

  def train(self, start_step=0, labeled_only=False):
    """The infinite training stream, from batch `start_step` on.

    With unlabelled images (and not `labeled_only`), batch k is
    `({'images': labelled, 'unlabeled_weak': weak, 'unlabeled_strong':
    strong}, labels)`: batch k of the labelled stream zipped with batch k of
    the unlabelled one, both resumed at `start_step`. Under tf.distribute
    every tensor of the batch is split between the replicas, so each gets
    its share of both streams.
    """
    batches = make_train_dataset(self.train_examples, start_step=start_step,
                                 **self.train_options)
    if labeled_only or self.unlabeled_options is None:
      return batches
    views = make_unlabeled_dataset(self.unlabeled_examples,
                                   start_step=start_step,
                                   **self.unlabeled_options)
    zipped = tf.data.Dataset.zip(batches, views).map(
        lambda batch, pair: ({unlabeled.LABELED: batch[0],
                              unlabeled.WEAK: pair[0],
                              unlabeled.STRONG: pair[1]}, batch[1]))
    return _shard_by_data(zipped.prefetch(tf.data.AUTOTUNE))


def from_config(config, pseudo_labels=None):
  """Loads the config's dataset; returns a `Data`.

  Reads and checks the data (a folder's every file is decoded once), so bad
  data fails here, before any model is built.

  Args:
    config: A ConfigDict with the keys of `keras_sft/default_config.py`.
    pseudo_labels: None, or a dict of `indices` and `labels` (int arrays),
      `files` and `num_unlabeled` (`keras_sft.training.self_training.read`):
      those unlabelled images (`config.unlabeled`, by position in their
      stream) join the training examples with those labels (self-training's
      student); refused if the unlabelled images are not those the labels
      were made for.
  """
  # A run checked it with every key; a library caller (create_datasets) not.
  balance.check_config(config)
  train_examples, eval_examples, info = load_examples(
      config.dataset, train_split=config.train_split,
      eval_split=config.eval_split, data_dir=config.data_dir,
      seed=config.seed, validation_fraction=config.validation_fraction,
      skip_corrupt_images=config.skip_corrupt_images,
      global_batch_size=config.global_batch_size,
      max_image_pixels=config.max_image_pixels,
      count_classes=balance.needs_counts(config))
  unlabeled_examples, unlabeled_options, names = None, None, None
  if config.unlabeled is not None:
    unlabeled_examples, count, names = unlabeled.load(
        config, info, train_examples, eval_examples, get_builder)
    info = dataclasses.replace(info, num_unlabeled_examples=count)
  if pseudo_labels is not None:
    train_examples, info = _with_pseudo_labels(
        train_examples, info, unlabeled_examples, names, pseudo_labels,
        seed=config.seed)
  weights = balance.class_weights(config.class_weight,
                                  info.train_class_counts, info.class_names)
  augmenter = batch_augment.create_batch_augmenter(
      info.num_classes, seed=config.seed,
      **batch_augment.options_from_config(config))
  if config.semi_supervised == 'fixmatch':
    unlabeled_options = dict(
        image_size=config.image_size,
        batch_size=config.fixmatch_mu * config.global_batch_size,
        seed=config.seed, shuffle_buffer_size=config.shuffle_buffer_size,
        cache=config.cache, resize_size=config.resize_size,
        randaugment_num_ops=config.fixmatch_randaugment_num_ops,
        randaugment_magnitude=config.fixmatch_randaugment_magnitude,
        cutout_fraction=config.fixmatch_cutout_fraction,
        **augment.switches_from_config(config))
  return Data(
      info=info,
      eval=make_eval_dataset(eval_examples, image_size=config.image_size,
                             global_batch_size=config.global_batch_size,
                             cache=config.cache,
                             resize_size=config.resize_size),
      train_examples=train_examples,
      train_options=dict(
          image_size=config.image_size,
          global_batch_size=config.global_batch_size, seed=config.seed,
          shuffle_buffer_size=config.shuffle_buffer_size, cache=config.cache,
          batch_augmenter=augmenter, resize_size=config.resize_size,
          sampling=config.sampling, class_counts=info.train_class_counts,
          class_weights=weights, **augment.switches_from_config(config)),
      unlabeled_examples=unlabeled_examples,
      unlabeled_options=unlabeled_options,
      unlabeled_names=names)


def _with_pseudo_labels(train_examples, info, images, names, pseudo_labels,
                        seed):
  """The labelled examples and the pseudo-labelled images, mixed.

  The two are interleaved in a seeded random order before the pipeline's
  shuffle, so a shuffle buffer smaller than the set still mixes them (a
  concatenation would start every epoch with the labelled images).
  """
  indices = np.asarray(pseudo_labels['indices'], np.int64)
  labels = np.asarray(pseudo_labels['labels'], np.int64)
  changed = None
  if pseudo_labels['num_unlabeled'] != info.num_unlabeled_examples:
    changed = (f'the teacher labelled {pseudo_labels["num_unlabeled"]} '
               f'unlabelled images; there are {info.num_unlabeled_examples} '
               'now')
  elif names is not None and pseudo_labels.get('files') is not None:
    for index, expected in zip(indices, pseudo_labels['files']):
      if names[index] != expected:
        changed = (f'unlabelled image {int(index)} was {expected!r} for the '
                   f'teacher and is {names[index]!r} now')
        break
    hashes = pseudo_labels.get('md5')
    if not changed and hashes is not None:
      now = unlabeled.file_hashes(pseudo_labels['files'])
      for name, expected, found in zip(pseudo_labels['files'], hashes, now):
        if expected != found:
          changed = f'{name!r} has other contents than it had'
          break
  if changed:
    raise errors.DataError(
        f'The unlabelled images changed since the teacher labelled them: '
        f'{changed}. Restore them, or delete the run\'s '
        'self_training/pseudo_labels_*.json (and its student) and rerun: '
        'the teacher labels the images again.')
  if not labels.size:
    raise errors.DataError(
        'The pseudo-label file holds no pseudo-labels. Delete the run\'s '
        'self_training/pseudo_labels_*.json and rerun: the teacher labels '
        'the images again.')
  if labels.max() >= info.num_classes:
    raise errors.DataError(
        f'The pseudo-labels hold label {int(labels.max())}, but the dataset '
        f'has {info.num_classes} classes: they were made for other data. '
        "Delete the run's self_training/pseudo_labels_*.json and rerun: the "
        'teacher labels the images again.')
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(
          tf.constant(indices, tf.int64), tf.constant(labels, tf.int64)),
      default_value=-1)
  pseudo = images.enumerate().map(
      lambda index, image: (image, table.lookup(index))).filter(
          lambda image, label: label >= 0)
  # 0: a labelled example next, 1: a pseudo-labelled one; as many of each
  # as there are.
  choices = np.random.default_rng([seed, _PSEUDO_LABEL_MIX_STREAM]).permutation(
      np.repeat(np.array([0, 1], np.int64),
                [info.num_train_examples, len(indices)]))
  mixed = tf.data.Dataset.choose_from_datasets(
      [train_examples, pseudo], tf.data.Dataset.from_tensor_slices(choices))
  counts = info.train_class_counts
  if counts:
    counts = tuple(int(count) for count in np.asarray(counts) + np.bincount(
        labels, minlength=info.num_classes))
  return mixed, dataclasses.replace(
      info, num_train_examples=info.num_train_examples + len(indices),
      train_class_counts=counts)


def split_dataset(config, split, class_names, held_out_from=()):
  """One more split of the config's dataset, batched as the eval split is.

  For a split beside the train and eval splits (the calibration split of
  `keras_sft.training.calibration`): the eval view (no augmentation), in a
  fixed order.

  Args:
    config: The run's ConfigDict.
    split: A tfds split string or a folder split, optionally sliced.
    class_names: The run's class names (a folder split must have them).
    held_out_from: For a folder, the files it must not share (the run's
      `info.files`; `folders.load_split`).

  Returns:
    `(dataset, num_examples)`: finite batches of `(images, labels)`.
  """
  if folders.is_folder_dataset(config.dataset):
    examples, count = folders.load_split(
        config.dataset, split, class_names,
        skip_corrupt_images=config.skip_corrupt_images,
        max_image_pixels=config.max_image_pixels,
        held_out_from=held_out_from)
  else:
    builder = get_builder(config.dataset, config.data_dir)
    examples = _read_split(builder, split, shuffle_files=False,
                           seed=config.seed)
    count = _num_examples(examples, split)
  dataset = make_eval_dataset(examples, image_size=config.image_size,
                              global_batch_size=config.global_batch_size,
                              cache=False, resize_size=config.resize_size)
  return dataset, count


def _offline_help(name, data_dir):
  where = data_dir or '~/tensorflow_datasets'
  return (
      f'Could not prepare the tfds dataset {name!r}: it is not in '
      f'data_dir={where!r} and could not be downloaded. Routes that need no '
      'network here: (1) copy a prepared dataset into that data_dir (or set '
      '--config.data_dir to where one is); (2) put the archive tfds would '
      f'download into {where}/downloads/manual/ (for CIFAR-10: '
      'cifar-10-binary.tar.gz) and run again; tfds checks its checksum and '
      'builds the dataset from it.')


@contextlib.contextmanager
def _download_retries(count):
  """tfds' downloader retries `count` times inside the block."""
  previous = tfds_downloader.MAX_RETRIES
  tfds_downloader.MAX_RETRIES = count
  try:
    yield
  finally:
    tfds_downloader.MAX_RETRIES = previous


def get_builder(name, data_dir=None):
  """Returns the tfds builder for `name`, prepared, or raises a clear error.

  A missing dataset is downloaded with few, quick retries, so an offline
  machine fails in about a second rather than retrying for minutes.

  Args:
    name: A tfds dataset name, optionally with config and version.
    data_dir: tfds data directory, or None for tfds' default.

  Raises:
    ValueError: `name` is not a tfds dataset.
    DatasetUnavailableError: it is neither prepared nor downloadable.
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise errors.ConfigError(
        f'Unknown tfds dataset: dataset={name!r}. See '
        'tfds.list_builders() for names.') from error
  except (ValueError, AssertionError, KeyError) as error:
    # A malformed name or a version tfds does not have ('cifar10:9.9.9').
    raise errors.ConfigError(
        f'Not a tfds dataset name: dataset={name!r} ({error}). Expected '
        "'name', 'name/config' or 'name:version' (tfds.list_builders() "
        "lists names), or 'folder:PATH' for an image folder.") from error
  # Offline, tfds retries a failed download for minutes; a couple of quick
  # retries still ride out a flaky server, and an offline machine fails in
  # about a second.
  with _download_retries(_DOWNLOAD_RETRIES):
    try:
      builder.download_and_prepare()
    except Exception as error:  # Download failures have many concrete types.
      raise DatasetUnavailableError(_offline_help(name, data_dir)) from error
  return builder


def class_names(builder):
  """The class names of a tfds builder's `label` feature ('0', '1', ...
  when it has none)."""
  label = builder.info.features['label']
  num_classes = label.num_classes
  names = getattr(label, 'names', None)
  if names and len(names) == num_classes:
    return tuple(names)
  return tuple(str(i) for i in range(num_classes))


def _read_split(builder, split, shuffle_files, seed):
  """The split's `(image, label)` records.

  Raises:
    DataError: the dataset has no such split (tfds' ValueError, a
      traceback before): e.g. `calibration_split='validation'` on CIFAR-10.
  """
  read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
  try:
    return builder.as_dataset(
        split=split, shuffle_files=shuffle_files, as_supervised=True,
        read_config=read_config)
  except ValueError as error:
    if 'split' not in str(error).lower():
      raise
    raise errors.DataError(
        f'The split {split!r} cannot be read from the tfds dataset '
        f'{builder.name!r} ({str(error).strip().splitlines()[0][:300]}). Its '
        f'splits: {sorted(builder.info.splits)}; name one of them, '
        'optionally sliced (e.g. "train[90%:]").') from error


def _num_examples(dataset, split):
  count = int(dataset.cardinality())
  if count < 0:
    raise errors.DataError(f'The size of split {split!r} is unknown to tfds.')
  if count == 0:
    raise errors.DataError(f'Split {split!r} holds no examples.')
  return count


def _check_image_shape(image):
  """Fails on images that are not 3-channel RGB, naming what arrived."""
  tf.debugging.assert_rank(image, 3, message='Expected HxWxC images.')
  tf.debugging.assert_equal(
      tf.shape(image)[-1], 3,
      message='Expected RGB images with 3 channels; convert the dataset or '
      'use an image folder (grayscale/RGBA are converted there).')
  return image


def create_datasets(dataset='cifar10',
                    *,
                    image_size,
                    global_batch_size,
                    train_split='train',
                    eval_split='test',
                    data_dir=None,
                    seed=0,
                    shuffle_buffer_size=10_000,
                    cache=True,
                    start_step=0,
                    validation_fraction=0.0,
                    skip_corrupt_images=False,
                    batch_augmentation=None,
                    resize_size=None,
                    random_crop=True,
                    random_flip=True,
                    max_image_pixels=images.DEFAULT_MAX_IMAGE_PIXELS,
                    class_weight=None,
                    sampling='shuffle'):
  """Builds the training and evaluation datasets.

  Args:
    dataset: A tfds name, or `folder:PATH` for an image folder.
    image_size: Side of the square images fed to the model.
    global_batch_size: Batch size summed over all replicas. Under a
      `tf.distribute` strategy Keras splits each batch across replicas.
    train_split: tfds split string for training (slices such as
      `train[:90%]` work); for a folder, a split folder name, optionally
      sliced the same way.
    eval_split: The same, for evaluation (e.g. `train[90%:]`).
    data_dir: tfds data directory (unused for folders).
    seed: Seeds shuffling and augmentation.
    shuffle_buffer_size: Size of the training shuffle buffer.
    cache: Keep decoded examples in memory after the first pass.
    start_step: Number of training batches already consumed by an earlier
      run; the training stream starts right after them.
    validation_fraction: Folders only: when > 0, hold out this fraction of
      each class of the train split for evaluation (`eval_split` unused).
    skip_corrupt_images: Folders only: skip unreadable image files (logged
      and counted) instead of failing before training.
    batch_augmentation: None, or a dict of keyword arguments of
      `batch_augment.create_batch_augmenter` (`mixup_alpha`, `cutmix_alpha`,
      `randaugment_num_ops`, `randaugment_magnitude`) for the training
      batches. With MixUp or CutMix on, training labels are soft one-hot
      `[batch, num_classes]` float32; eval labels stay class ids.
    resize_size: None, or resize every training image to this side before
      the random crop (see `augment_for_training`).
    random_crop: Crop training images at a random position (else the eval
      view); see `augment_for_training`.
    random_flip: Flip training images horizontally at random.
    max_image_pixels: Folders only: images with more pixels (from their
      header) are unreadable files, never decoded.
    class_weight: None, 'balanced' or {class name or id: weight}: training
      batches then carry per-example sample weights (`balance`).
    sampling: 'shuffle' or 'balanced' (class-balanced draws; `balance`).

  Returns:
    `(train_dataset, eval_dataset, info)`: an infinite training dataset of
    `(images, labels)` batches, a finite eval dataset and a `DatasetInfo`.
  """
  errors.check_positive('image_size', image_size)
  errors.check_positive('global_batch_size', global_batch_size)
  if not isinstance(batch_augmentation or {}, dict):
    raise errors.ConfigError(
        'batch_augmentation must be a dict of batch augmentation keys '
        f'({sorted(batch_augment.OFF)}). Received: '
        f'batch_augmentation={batch_augmentation!r}')
  augmentation = dict(batch_augment.OFF)
  for key, value in (batch_augmentation or {}).items():
    errors.check_choice('batch_augmentation key', key,
                        tuple(batch_augment.OFF))
    augmentation[key] = value
  # The keys `from_config` reads: a run and a library caller get their data
  # from the same wiring.
  data = from_config(ml_collections.ConfigDict(dict(
      dataset=dataset, train_split=train_split, eval_split=eval_split,
      data_dir=data_dir, seed=seed, validation_fraction=validation_fraction,
      skip_corrupt_images=skip_corrupt_images,
      global_batch_size=global_batch_size, max_image_pixels=max_image_pixels,
      image_size=image_size, cache=cache, resize_size=resize_size,
      shuffle_buffer_size=shuffle_buffer_size, random_crop=random_crop,
      random_flip=random_flip, class_weight=class_weight, sampling=sampling,
      unlabeled=None, semi_supervised=None,
      **augmentation)))
  return data.train(start_step), data.eval, data.info


def load_examples(dataset, *, train_split='train', eval_split='test',
                  data_dir=None, seed=0, validation_fraction=0.0,
                  skip_corrupt_images=False, global_batch_size=1,
                  max_image_pixels=images.DEFAULT_MAX_IMAGE_PIXELS,
                  count_classes=False):
  """Reads a tfds dataset or an image folder as decoded examples.

  Args: as `create_datasets`; `global_batch_size` only checks that the train
    split holds at least one batch; `count_classes`: count a tfds train
    split's classes (one pass over its labels; a folder's are always
    counted, from its file lists).

  Returns:
    `(train_examples, eval_examples, info)`: datasets of `(image uint8
    [H, W, 3], label int64)` and a `DatasetInfo`.
  """
  files = ()
  counts = ()
  if folders.is_folder_dataset(dataset):
    (train_data, eval_data, names, num_train,
     num_eval, files, counts) = folders.load(
         dataset, train_split=train_split, eval_split=eval_split,
         validation_fraction=validation_fraction,
         skip_corrupt_images=skip_corrupt_images, seed=seed,
         max_image_pixels=max_image_pixels)
  else:
    if validation_fraction:
      raise errors.ConfigError(
          f'validation_fraction={validation_fraction} is for image folders. '
          f'For the tfds dataset {dataset!r} use split slices instead, e.g. '
          'train_split="train[:90%]" and eval_split="train[90%:]".')
    builder = get_builder(dataset, data_dir)
    train_data = _read_split(builder, train_split, shuffle_files=True,
                             seed=seed)
    eval_data = _read_split(builder, eval_split, shuffle_files=False,
                            seed=seed)
    num_train = _num_examples(train_data, train_split)
    num_eval = _num_examples(eval_data, eval_split)
    names = class_names(builder)
    if count_classes:
      counts = balance.count_tfds_labels(builder, train_split, len(names))
  if num_train < global_batch_size:
    raise errors.DataError(
        f'The train split {train_split!r} has {num_train} examples, fewer '
        f'than one global batch (global_batch_size={global_batch_size}).')
  info = DatasetInfo(
      num_classes=len(names),
      class_names=tuple(names),
      num_train_examples=num_train,
      num_eval_examples=num_eval,
      files=files,
      train_class_counts=tuple(int(count) for count in counts))
  logging.info('Dataset %s: %d train / %d eval examples, %d classes.',
               dataset, num_train, num_eval, info.num_classes)
  return train_data, eval_data, info


def _shard_by_data(dataset):
  """Shards across workers by element, not by file.

  Under MultiWorkerMirroredStrategy, Keras splits each global batch between
  the workers. tfds datasets have few files (CIFAR-10: one per split), so the
  default FILE sharding would leave workers without data; DATA sharding has
  every worker run the same deterministic stream and keep its part of each
  batch, so the batches, and the updates, are those of a single process.
  It costs each worker the reading and augmentation of the whole stream.
  """
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA)
  return dataset.with_options(options)


def _checked_and_cached(examples, image_size, resize_size, cache):
  """RGB checked, large images shrunk to what the pipeline resizes to, then
  cached when `cache`: the shared start of the train and eval pipelines."""
  side = augment.stored_side(image_size, resize_size)
  examples = examples.map(
      lambda image, label: (augment.shrink(_check_image_shape(image), side),
                            label),
      num_parallel_calls=tf.data.AUTOTUNE)
  return examples.cache() if cache else examples


def _endless_shuffle(examples, shuffle_buffer_size, epoch_seed):
  """`examples` in a new seeded order each epoch, repeated forever.

  One shuffle per epoch, so every epoch sees each example exactly once, in
  an order seeded by `epoch_seed(epoch)`; the orders repeat after
  _DISTINCT_EPOCH_ORDERS epochs (the augmentation still differs, being
  seeded by the position in the stream). Not `reshuffle_each_iteration`:
  the seeds it draws for later epochs differ between a process and a
  worker of MultiWorkerMirroredStrategy, whose batches would then differ.
  """
  epochs = [
      examples.shuffle(shuffle_buffer_size, seed=epoch_seed(epoch),
                       reshuffle_each_iteration=False)
      for epoch in range(_DISTINCT_EPOCH_ORDERS)
  ]
  return functools.reduce(tf.data.Dataset.concatenate, epochs).repeat()


def make_train_dataset(examples, *, image_size, global_batch_size, seed=0,
                       shuffle_buffer_size=10_000, cache=True, start_step=0,
                       batch_augmenter=None, resize_size=None,
                       sampling='shuffle', class_counts=(),
                       class_weights=None, **switches):
  """Turns `(image, label)` examples into an infinite stream of batches.

  `batch_augmenter`: None or a function from
  `batch_augment.create_batch_augmenter`, applied to whole batches.
  `sampling`: 'shuffle' (each example once per epoch) or 'balanced' (every
  class equally likely per draw; needs `class_counts`, examples per class).
  `class_weights`: None, or float `[num_classes]`: the batches are then
  `(images, labels, sample_weights)` (`balance.sample_weights`).
  `switches`: per-image augmentations on or off (`random_crop`,
  `random_flip`: `augment.AUGMENTATIONS`).
  """
  # Validate before caching so a wrong channel count fails on the first
  # element, not after hours. Large images are shrunk to what the
  # augmentation needs first (whether cached or not, so the stream is the
  # same either way).
  # Cache decoded, un-augmented examples: augmentation must differ per epoch.
  if sampling == balance.BALANCED:
    # Per-class streams, each cached on its own (so after the first pass no
    # class re-reads the others' examples) and shuffled like the whole
    # split is below, drawn from by a seeded choice: as deterministic, so
    # resuming is as exact.
    examples = _checked_and_cached(examples, image_size, resize_size,
                                   cache=False)
    examples = balance.balanced_stream(
        examples, class_counts, seed,
        lambda class_examples, count, epoch_seed: _endless_shuffle(
            class_examples.cache() if cache else class_examples,
            min(shuffle_buffer_size, count), epoch_seed))
  else:
    examples = _checked_and_cached(examples, image_size, resize_size, cache)
    examples = _endless_shuffle(
        examples, shuffle_buffer_size,
        lambda epoch: seed * _SEED_STRIDE + epoch)
  # Number the examples of the stream: the index seeds the augmentation of
  # that example, independent of parallelism and of where a run resumed.
  examples = examples.enumerate()
  # Skip what an interrupted run already trained on, before the expensive
  # augmentation, so resuming costs only reading.
  if start_step:
    examples = examples.skip(start_step * global_batch_size)

  def augment_example(index, example):
    image, label = example
    example_seed = tf.stack([tf.cast(seed, tf.int64), index])
    return augment.augment_for_training(image, image_size, example_seed,
                                        resize_size, **switches), label

  # Augment per example in parallel; the output order stays deterministic.
  examples = examples.map(augment_example, num_parallel_calls=tf.data.AUTOTUNE)
  # drop_remainder keeps static batch shapes, which replicas and XLA need.
  batches = examples.batch(global_batch_size, drop_remainder=True)
  if batch_augmenter is not None:
    # After batching: MixUp/CutMix mix the images of one batch with each
    # other, and Keras' layers work on batches. Numbered from start_step, so
    # batch k gets the same augmentation whether or not the run resumed; the
    # augmenter is stateless, so a parallel map stays deterministic.
    batches = batches.enumerate(start=start_step).map(
        lambda index, batch: batch_augmenter(index, *batch),
        num_parallel_calls=tf.data.AUTOTUNE)
  if class_weights is not None:
    # After mixing: a mixed example's weight follows its soft label.
    batches = balance.with_sample_weights(batches, class_weights)
  # Overlap the input pipeline with the training step.
  return _shard_by_data(batches.prefetch(tf.data.AUTOTUNE))


# Random streams of an unlabelled example, folded into its seed.
_WEAK_STREAM, _STRONG_STREAM, _CUTOUT_STREAM = 1, 2, 3


def make_unlabeled_dataset(images, *, image_size, batch_size, seed=0,
                           shuffle_buffer_size=10_000, cache=True,
                           start_step=0, resize_size=None,
                           randaugment_num_ops=2, randaugment_magnitude=0.5,
                           cutout_fraction=0.5, **switches):
  """Unlabelled images as an infinite stream of `(weak, strong)` batches.

  Resumable as the labelled stream is (`make_train_dataset`): the order is
  seeded per epoch (its own seeds, not the labelled stream's), example i of
  the stream is augmented with seeds from `(seed, i)`, and a run resumed at
  step k skips the k·`batch_size` images it trained on. Weak view: the
  per-image augmentation of labelled images (`switches`: random crop and
  flip). Strong view: the same with its own draws, then
  `keras.layers.RandAugment` on the batch (`batch_augment`'s seeded layer,
  seeded by the batch index; Keras chooses the operations per batch, with
  per-image strengths, where FixMatch chooses them per image), then a cutout
  square per image (`unlabeled.cutout`).

  Args:
    images: uint8 `[H, W, 3]` images.
    image_size: Side of the output views.
    batch_size: Unlabelled images per step (μ × global_batch_size).
    seed: Seeds the order and every augmentation.
    shuffle_buffer_size: Shuffle buffer, as for labelled examples.
    cache: Keep decoded images in memory.
    start_step: Steps already trained.
    resize_size: As for labelled images.
    randaugment_num_ops: RandAugment's operations per batch; 0: none.
    randaugment_magnitude: RandAugment's `factor` in [0, 1].
    cutout_fraction: Largest cutout side / image side; 0: none.
    **switches: `augment.AUGMENTATIONS` keys.

  Returns:
    A dataset of `(weak, strong)` float32 `[batch_size, image_size,
    image_size, 3]` pairs in [0, 255].
  """
  examples = _checked_and_cached(images.map(lambda image: (image, 0)),
                                 image_size, resize_size, cache)
  # The labelled stream uses first seeds seed * _SEED_STRIDE + e, e < 16.
  examples = _endless_shuffle(
      examples, shuffle_buffer_size,
      lambda epoch: seed * _SEED_STRIDE + _DISTINCT_EPOCH_ORDERS + epoch)
  examples = examples.enumerate()
  if start_step:
    examples = examples.skip(start_step * batch_size)

  def views(index, example):
    image = example[0]
    example_seed = tf.stack([tf.cast(seed, tf.int64), index])
    stream = lambda number: tf.random.experimental.stateless_fold_in(
        example_seed, number)
    weak = augment.augment_for_training(image, image_size,
                                        stream(_WEAK_STREAM), resize_size,
                                        **switches)
    strong = augment.augment_for_training(image, image_size,
                                          stream(_STRONG_STREAM),
                                          resize_size, **switches)
    return weak, strong

  pairs = examples.map(views, num_parallel_calls=tf.data.AUTOTUNE)
  batches = pairs.batch(batch_size, drop_remainder=True)
  randaugment = batch_augment.create_batch_augmenter(
      1, seed=seed * _SEED_STRIDE + 1,
      randaugment_num_ops=randaugment_num_ops,
      randaugment_magnitude=randaugment_magnitude)

  def strong_batch(index, weak, strong):
    # Numbered from start_step: batch k is the same, resumed or not.
    if randaugment is not None:
      strong, _ = randaugment(index, strong, tf.zeros([batch_size], tf.int64))
    batch_seed = tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64)])
    return weak, unlabeled.cutout(
        strong, tf.random.experimental.stateless_fold_in(batch_seed,
                                                         _CUTOUT_STREAM),
        cutout_fraction)

  return batches.enumerate(start=start_step).map(
      lambda index, pair: strong_batch(index, *pair),
      num_parallel_calls=tf.data.AUTOTUNE)


def make_eval_dataset(examples, *, image_size, global_batch_size, cache=True,
                      resize_size=None):
  """Turns `(image, label)` examples into a finite dataset of batches.

  `resize_size`: the training `resize_size`; see `preprocess_for_eval`.
  """
  # Cache the decoded uint8 images, before the final resize (at 224px the
  # resized float32 CIFAR-10 test set would take 6 GB instead of 30 MB),
  # but large ones shrunk to what the resize needs.
  examples = _checked_and_cached(examples, image_size, resize_size, cache)
  examples = examples.map(
      lambda image, label: (augment.preprocess_for_eval(image, image_size,
                                                        resize_size), label),
      num_parallel_calls=tf.data.AUTOTUNE)
  # Keep the last, smaller batch: every eval example counts once.
  batches = examples.batch(global_batch_size, drop_remainder=False)
  return _shard_by_data(batches.prefetch(tf.data.AUTOTUNE))
