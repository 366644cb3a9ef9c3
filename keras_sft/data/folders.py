"""Image folders as datasets: `folder:PATH` in `config.dataset`.

Two layouts are understood:

    PATH/train/<class>/*.jpg|*.jpeg|*.png    split folders: `train_split` and
    PATH/test/<class>/...                    `eval_split` name subfolders
    PATH/val/<class>/...                     (`train`, `test`, `val`, ...)

    PATH/<class>/*.png                       one folder: `validation_fraction`
                                             of each class is held out for
                                             evaluation

Split strings accept tfds-style slices, `train[:90%]`, `train[90%:]`,
`train[:100]`, applied to a fixed order of the split's files (ordered by a
hash of `<class>/<file name>`, so classes are interleaved and the order does
not depend on the seed: `train[:90%]` and `train[90%:]` never overlap).

Class names are the sorted class folder names; label `i` is the `i`-th name.
Subfolders of a class folder are read too, symlinked ones included; a
symlink that leads back to a folder already read (a loop) is an error.
Images are decoded in a parallel `tf.data` map; grayscale and RGBA become RGB
(alpha is dropped), 16-bit PNGs become 8-bit, and images of mixed sizes are
fine (the input pipeline resizes each one).

Every file is decoded once before training starts (`images.find_unreadable`), so a
corrupt or unreadable file is named by path before any model is built, or
skipped and counted with `skip_corrupt_images=True`.
"""

import dataclasses
import hashlib
import logging
import os
import re

import numpy as np
import tensorflow as tf

from keras_sft.data import images
from keras_sft import errors

PREFIX = 'folder:'
# Lower-case file extensions read as images; other files are ignored.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
# Unreadable files listed in an error message (all of them are counted).
_MAX_LISTED = 20
# find_unreadable results by (path, size, mtime) of every file: a resumed run
# builds its datasets twice in one process and need not decode twice. Three
# entries: the train and eval splits, the calibration split (`load_split`)
# and the unlabelled images (`data.unlabeled`).
_CHECKED = {}
_CHECKED_KEPT = 3

_SPLIT_PATTERN = re.compile(
    r'^(?P<name>[^\[\]]+?)\s*(\[\s*(?P<start>-?[\d.]+%?)?\s*:\s*'
    r'(?P<end>-?[\d.]+%?)?\s*\])?$')


@dataclasses.dataclass(frozen=True)
class FolderSplit:
  """The files of one split and their labels.

  Attributes:
    paths: Image file paths.
    labels: Class id of each path.
  """
  paths: tuple
  labels: tuple

  def __len__(self):
    return len(self.paths)


def is_folder_dataset(dataset):
  """True for a `folder:PATH` dataset name."""
  return isinstance(dataset, str) and dataset.startswith(PREFIX)


def folder_root(dataset):
  """Returns PATH of `folder:PATH`, with `~` expanded."""
  return os.path.expanduser(dataset[len(PREFIX):])


def parse_split(split):
  """Parses `name` or `name[start:end]` (ints or percentages).

  Args:
    split: A split string, e.g. `train`, `train[:90%]`, `train[-100:]`.

  Returns:
    `(name, start, end)`; `start` and `end` are None or strings as written.

  Raises:
    ValueError: `split` is not of that form.
  """
  match = _SPLIT_PATTERN.match(split.strip())
  if not match or not all(_is_bound(match.group(group))
                          for group in ('start', 'end')):
    raise errors.DataError(
        f'Cannot parse the split {split!r}. Expected a folder name with an '
        'optional slice of integer indices or percentages, e.g. "train", '
        '"train[:90%]", "train[90%:]" or "train[-100:]".')
  return match.group('name'), match.group('start'), match.group('end')


def _is_bound(text):
  """Whether a slice bound is absent, an integer, or a number and '%'
  (the pattern also lets through '1.2.3' and '2.5', which are neither)."""
  if text is None:
    return True
  try:
    if text.endswith('%'):
      float(text[:-1])
    else:
      int(text)
  except ValueError:
    return False
  return True


def _bound(text, size):
  if text is None:
    return None
  if text.endswith('%'):
    # Rounded like tfds' percent slices.
    return int(round(float(text[:-1]) * size / 100))
  return int(text)


def _slice(split, start, end):
  size = len(split)
  selected = slice(_bound(start, size), _bound(end, size))
  return FolderSplit(split.paths[selected], split.labels[selected])


def _fixed_order(root_relative_paths):
  """Indices ordering files by a hash of their `<class>/<name>` path."""
  keys = [hashlib.md5(path.encode('utf-8')).hexdigest()
          for path in root_relative_paths]
  return sorted(range(len(keys)), key=lambda i: (keys[i],
                                                 root_relative_paths[i]))


def list_classes(directory):
  """Returns the sorted class folder names in `directory`.

  Raises:
    FileNotFoundError: `directory` does not exist.
    ValueError: it holds no class folders.
  """
  if not os.path.isdir(directory):
    raise errors.PathNotFoundError(
        f'Image folder {directory!r} does not exist. Expected '
        '<PATH>/train/<class>/* and <PATH>/test/<class>/*, or <PATH>/<class>/* '
        'with --config.validation_fraction.')
  names = sorted(name for name in os.listdir(directory)
                 if os.path.isdir(os.path.join(directory, name)) and
                 not name.startswith('.'))
  if not names:
    raise errors.DataError(
        f'No class folders in {directory!r}: no images at all. Put the images '
        f'of each class in their own subfolder, {directory}/<class>/*.png.')
  return names


def list_split(directory, class_names=None):
  """Lists the images of one split folder, `directory/<class>/*`.

  Args:
    directory: The split folder.
    class_names: The classes expected (those of the train split), or None to
      take them from `directory`.

  Returns:
    `(class_names, split)`: the sorted class names and a `FolderSplit` of all
    images in the fixed, hash-based order (see the module docstring).

  Raises:
    FileNotFoundError: `directory` does not exist.
    ValueError: no class folders, an empty class folder, or class folders that
      differ from `class_names`.
  """
  found = list_classes(directory)
  if class_names is not None and tuple(found) != tuple(class_names):
    missing = sorted(set(class_names) - set(found))
    extra = sorted(set(found) - set(class_names))
    raise errors.DataError(
        f'The class folders of {directory!r} differ from the train split\'s: '
        f'missing {missing}, unexpected {extra}. Every split needs the same '
        'class folders (an empty one is an error too); rename or add them.')
  relative, labels, ignored = [], [], 0
  for label, name in enumerate(found):
    class_dir = os.path.join(directory, name)
    files = []
    visited = {os.path.realpath(class_dir)}
    for root, dirs, file_names in os.walk(class_dir, followlinks=True):
      dirs.sort()
      _check_not_visited(root, dirs, visited, class_dir)
      for file_name in sorted(file_names):
        if os.path.splitext(file_name)[1].lower() in IMAGE_EXTENSIONS:
          files.append(os.path.relpath(os.path.join(root, file_name),
                                       directory))
        elif not file_name.startswith('.'):
          ignored += 1
    if not files:
      raise errors.DataError(
          f'Class folder {class_dir!r} holds no images '
          f'({"/".join(IMAGE_EXTENSIONS)}). Add images or remove the folder '
          'from every split.')
    relative.extend(files)
    labels.extend([label] * len(files))
  if ignored:
    logging.warning('Ignored %d files in %s that are not %s images.', ignored,
                    directory, '/'.join(IMAGE_EXTENSIONS))
  order = _fixed_order(relative)
  split = FolderSplit(
      paths=tuple(os.path.join(directory, relative[i]) for i in order),
      labels=tuple(labels[i] for i in order))
  return tuple(found), split


def _check_not_visited(root, dirs, visited, class_dir):
  """Raises on a folder of `dirs` that the walk of `class_dir` already read.

  Symlinks to folders are followed, so a link to a folder above it (a
  loop) would read the same images again and again.
  """
  for name in dirs:
    path = os.path.join(root, name)
    real = os.path.realpath(path)
    if real in visited:
      raise errors.DataError(
          f'{path!r} leads to {real!r}, a folder already read for the class '
          f'folder {class_dir!r}: a symlink loop (or two links to one '
          'folder) would read its images again and again. Remove or fix the '
          'symlink.')
    visited.add(real)


def hold_out(split, num_classes, fraction):
  """Splits `split` into train and validation, `fraction` of each class.

  Per class, the last `round(fraction * n)` files in the fixed order are held
  out, so the validation set is stratified and does not depend on the seed.

  Returns:
    `(train, validation)` FolderSplits.
  """
  labels = np.asarray(split.labels)
  held = np.zeros(len(labels), bool)
  for label in range(num_classes):
    indices = np.flatnonzero(labels == label)
    count = int(round(fraction * len(indices)))
    if count:
      held[indices[len(indices) - count:]] = True
  pick = lambda mask: FolderSplit(  # pylint: disable=g-long-lambda
      tuple(p for p, m in zip(split.paths, mask) if m),
      tuple(int(l) for l, m in zip(split.labels, mask) if m))
  return pick(~held), pick(held)


def find_splits(root, train_split='train', eval_split='test',
                validation_fraction=0.0):
  """Finds the train and eval files of an image folder.

  Args:
    root: PATH of `folder:PATH`.
    train_split: Split folder for training, optionally sliced (`train[:90%]`).
    eval_split: Split folder for evaluation, optionally sliced; unused when
      `validation_fraction` > 0.
    validation_fraction: When > 0, hold out this fraction of each class of the
      train split for evaluation; `root` may then hold the class folders
      directly.

  Returns:
    `(class_names, train, eval)`, the latter two `FolderSplit`s.

  Raises:
    FileNotFoundError: a folder is missing.
    ValueError: a layout or split problem, naming the path.
  """
  if not 0 <= validation_fraction < 1:
    raise errors.DataError(
        'validation_fraction must be in [0, 1). Received: '
        f'validation_fraction={validation_fraction!r}')
  if not os.path.isdir(root):
    raise errors.PathNotFoundError(
        f'Image folder {root!r} (from dataset="folder:{root}") does not '
        'exist. Give the folder that holds train/<class>/* and '
        'test/<class>/*, or <class>/* with --config.validation_fraction.')
  train_name, train_start, train_end = parse_split(train_split)
  train_dir = os.path.join(root, train_name)
  if not os.path.isdir(train_dir):
    if validation_fraction <= 0:
      raise errors.PathNotFoundError(
          f'{root!r} holds no {train_name}/ folder. Either use '
          f'{root}/{train_name}/<class>/* and {root}/test/<class>/*, or keep '
          f'{root}/<class>/* and set --config.validation_fraction=0.1 to '
          'hold out 10% of each class for evaluation.')
    train_dir = root  # One folder of class folders.
  class_names, train = list_split(train_dir)
  train = _slice(train, train_start, train_end)
  empty = _classes_without_images(train, class_names)
  if empty and len(train):  # pylint: disable=g-explicit-length-test
    raise errors.DataError(
        f'The train split {train_split!r} of {root!r} selects {len(train)} '
        f'images and none of the classes {empty}. Widen the slice, or add '
        'images of these classes.')
  if validation_fraction > 0:
    train, evaluation = hold_out(train, len(class_names), validation_fraction)
    empty = _classes_without_images(train, class_names)
    if empty:
      raise errors.DataError(
          f'validation_fraction={validation_fraction} holds out every image '
          f'of the classes {empty} of {train_split!r} in {train_dir!r} (of a '
          'class of n images, round(validation_fraction * n) go to '
          'evaluation), leaving none to train on. Add images to these '
          'classes, or lower validation_fraction.')
    logging.info('Held out %d of %d images of %s for evaluation '
                 '(validation_fraction=%g).', len(evaluation),
                 len(train) + len(evaluation), train_dir, validation_fraction)
  else:
    eval_name, eval_start, eval_end = parse_split(eval_split)
    eval_dir = os.path.join(root, eval_name)
    if not os.path.isdir(eval_dir):
      raise errors.PathNotFoundError(
          f'Eval folder {eval_dir!r} (eval_split={eval_split!r}) does not '
          'exist. Create it with the same class folders as '
          f'{train_dir!r}, set --config.eval_split to an existing split '
          '(e.g. "val", or "train[90%:]" with train_split="train[:90%]"), or '
          'set --config.validation_fraction.')
    _, evaluation = list_split(eval_dir, class_names)
    evaluation = _slice(evaluation, eval_start, eval_end)
  for name, split, text in (('train', train, train_split),
                            ('eval', evaluation, eval_split)):
    if not len(split):  # pylint: disable=g-explicit-length-test
      raise errors.DataError(
          f'The {name} split {text!r} of {root!r} selects no images '
          f'(validation_fraction={validation_fraction}). Widen the slice or '
          'add images.')
  return class_names, train, evaluation


def _classes_without_images(split, class_names):
  counts = np.bincount(np.asarray(split.labels, dtype=np.int64),
                       minlength=len(class_names))
  return [class_names[i] for i in np.flatnonzero(counts == 0)]


def _describe(bad, total, root, max_pixels):
  listed = '\n  '.join(images.reason(path, max_pixels)
                       for path in bad[:_MAX_LISTED])
  more = (f'\n  ... and {len(bad) - _MAX_LISTED} more'
          if len(bad) > _MAX_LISTED else '')
  return (f'{len(bad)} of {total} image files in {root!r} cannot be read as '
          f'JPEG or PNG:\n  {listed}{more}')


def _signature(path):
  try:
    stat = os.stat(path)
  except OSError:
    return (path, None, None)
  return (path, stat.st_size, stat.st_mtime_ns)


def check_files(splits, root, skip_corrupt_images=False, max_pixels=None):
  """Decodes every file of `splits` once; fails or skips unreadable ones.

  All splits are checked in one pass, so one error lists every bad file.

  Args:
    splits: A list of FolderSplits.
    root: The dataset folder, for messages.
    skip_corrupt_images: Drop unreadable files (logged and counted) instead of
      failing.
    max_pixels: None, or the most pixels an image may have; larger ones are
      unreadable files.

  Returns:
    `(splits, num_skipped)`: `splits` without the unreadable files.

  Raises:
    ValueError: unreadable files, listed by path, unless skipped.
  """
  every_path = [path for split in splits for path in split.paths]
  key = (max_pixels,) + tuple(_signature(path) for path in every_path)
  if key not in _CHECKED:
    while len(_CHECKED) >= _CHECKED_KEPT:  # The oldest goes.
      _CHECKED.pop(next(iter(_CHECKED)))
    _CHECKED[key] = images.find_unreadable(every_path, max_pixels)
  bad = _CHECKED[key]
  if not bad:
    return list(splits), 0
  message = _describe(bad, len(every_path), root, max_pixels)
  if not skip_corrupt_images:
    raise errors.DataError(
        message + '\nDelete or replace these files, or set '
        '--config.skip_corrupt_images=True to train without them.')
  logging.warning('%s\nSkipping them (skip_corrupt_images=True).', message)
  bad = set(bad)
  kept = []
  for split in splits:
    pairs = [(path, label) for path, label in zip(split.paths, split.labels)
             if path not in bad]
    if not pairs:
      raise errors.DataError(
          f'No readable images left in a split of {root!r} after skipping '
          'unreadable files. Add readable images.')
    paths, labels = zip(*pairs)
    kept.append(FolderSplit(paths, labels))
  return kept, len(bad)


def check_every_class_has_images(split, class_names, root, name):
  """Raises if skipping files emptied a class of the train split."""
  empty = _classes_without_images(split, class_names)
  if empty:
    raise errors.DataError(
        f'After skipping unreadable files, the {name} split of {root!r} has '
        f'no images of the classes {empty}. Add readable images.')


def to_dataset(split, shuffle_seed=None, max_pixels=None):
  """A dataset of `(image uint8 [H, W, 3], label int64)` examples.

  Args:
    split: A FolderSplit.
    shuffle_seed: If not None, the file order is permuted with this seed
      before decoding, so that a shuffle buffer smaller than the dataset
      still mixes classes; None keeps the split's fixed order.
    max_pixels: None, or the most pixels an image may have (see
      `decode_image`).
  """
  order = np.arange(len(split))
  if shuffle_seed is not None:
    order = np.random.default_rng(shuffle_seed).permutation(len(split))
  paths = np.asarray(split.paths, dtype=object)[order]
  labels = np.asarray(split.labels, dtype=np.int64)[order]
  files = tf.data.Dataset.from_tensor_slices((paths, labels))
  # Decode in parallel; deterministic=True keeps the file order, which the
  # seeded, resumable training stream and the in-order eval rely on.
  return files.map(
      lambda path, label: (
          images.decode_image(tf.io.read_file(path), path, max_pixels),
          label),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def load(dataset, train_split='train', eval_split='test',
         validation_fraction=0.0, skip_corrupt_images=False, seed=0,
         max_image_pixels=images.DEFAULT_MAX_IMAGE_PIXELS):
  """Lists, checks and opens a `folder:PATH` dataset.

  Args:
    dataset: `folder:PATH`.
    train_split: See `find_splits`.
    eval_split: See `find_splits`.
    validation_fraction: See `find_splits`.
    skip_corrupt_images: See `check_files`.
    seed: Seeds the permutation of the training files.
    max_image_pixels: Images with more pixels (width x height, read from
      the header) are not decoded: they are unreadable files.

  Returns:
    `(train_examples, eval_examples, class_names, num_train, num_eval,
    files, train_counts)`; `files` are the paths the splits list (each file
    is opened, unreadable ones included), which the workdir fingerprints;
    `train_counts` the readable train images per class (int64
    `[num_classes]`).
  """
  root = folder_root(dataset)
  class_names, train, evaluation = find_splits(
      root, train_split, eval_split, validation_fraction)
  files = tuple(sorted(set(train.paths) | set(evaluation.paths)))
  (train, evaluation), skipped = check_files(
      [train, evaluation], root, skip_corrupt_images, max_image_pixels)
  check_every_class_has_images(train, class_names, root, 'train')
  logging.info(
      'Image folder %s: %d classes, %d train / %d eval images (%d unreadable '
      'files skipped).', root, len(class_names), len(train), len(evaluation),
      skipped)
  return (to_dataset(train, shuffle_seed=seed, max_pixels=max_image_pixels),
          to_dataset(evaluation, max_pixels=max_image_pixels),
          class_names, len(train), len(evaluation), files,
          np.bincount(np.asarray(train.labels, np.int64),
                      minlength=len(class_names)))


def load_split(dataset, split, class_names, skip_corrupt_images=False,
               max_image_pixels=images.DEFAULT_MAX_IMAGE_PIXELS,
               held_out_from=()):
  """Lists, checks and opens one more split folder of a `folder:PATH` dataset.

  For a split beside the train and eval splits (the calibration split):
  the same class folders, slicing, file checks and fixed order.

  Args:
    dataset: `folder:PATH`.
    split: A split folder name, optionally sliced (`val`, `val[:50%]`).
    class_names: The train split's class names.
    skip_corrupt_images: See `check_files`.
    max_image_pixels: As in `load`.
    held_out_from: Paths of files this split must not share (the run's
      train and eval files, `load`'s `files`), compared after resolving
      symbolic links: a `val` that is a link to `test` (or holds links to
      its files) passes the config's check of the split names.

  Returns:
    `(examples, num_examples)`: a dataset of `(image uint8 [H, W, 3], label
    int64)` in the fixed order, and its size.

  Raises:
    DataError: among others, the split shares files with `held_out_from`.
  """
  root = folder_root(dataset)
  name, start, end = parse_split(split)
  directory = os.path.join(root, name)
  if not os.path.isdir(directory):
    raise errors.PathNotFoundError(
        f'Split folder {directory!r} ({split!r}) does not exist. Create it '
        'with the same class folders as the train split, or name an '
        'existing split folder.')
  _, files = list_split(directory, class_names)
  files = _slice(files, start, end)
  if not len(files):  # pylint: disable=g-explicit-length-test
    raise errors.DataError(f'The split {split!r} of {root!r} selects no '
                           'images. Widen the slice or add images.')
  others = {os.path.realpath(path) for path in held_out_from}
  shared = [path for path in files.paths if os.path.realpath(path) in others]
  if shared:
    raise errors.DataError(
        f'The split {split!r} of {root!r} shares {len(shared)} of its '
        f'{len(files)} files with the train or eval split (after following '
        f'symbolic links), e.g. {shared[0]!r} is '
        f'{os.path.realpath(shared[0])!r}. '
        'Hold out images of its own: copy them into a real folder.')
  (files,), _ = check_files([files], root, skip_corrupt_images,
                            max_image_pixels)
  return to_dataset(files, max_pixels=max_image_pixels), len(files)
