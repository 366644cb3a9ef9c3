"""Class imbalance: class weights and a class-balanced training stream.

Two config keys, both counted on the train split the run actually uses:

  class_weight  None, 'balanced' or {class name or class id: weight}. Each
                training example gets the weight of its class as its
                `sample_weight`; Keras' loss is then Σᵢ wᵢ·CEᵢ / N over a
                batch of N (the Classifier's train_step passes it to
                `compute_loss` and to the training metrics). 'balanced' is
                scikit-learn's n_samples / (n_classes · count_c), over the
                classes present in the split, so the mean weight over the
                split is 1 and the learning rate keeps its meaning. A
                mapping sets the named classes; the others keep 1.0.
  sampling      'shuffle' (every example once per epoch, in a seeded order)
                or 'balanced': each draw picks a class uniformly (a seeded
                `tf.data.Dataset.sample_from_datasets`) and takes the next
                example of that class's own endless, seeded, shuffled
                stream; minority classes repeat, majority ones are seen
                less often.

With MixUp or CutMix the labels are soft rows y (summing to 1); the weight of
a mixed example is then Σ_c y_c·w_c, the weights of its two sources mixed in
the same proportion as its label (for a hard label, w of its class).
"""

import logging
import math
import time

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_sft import errors

SAMPLINGS = ('shuffle', 'balanced')
BALANCED = 'balanced'


def _is_mapping(value):
  return isinstance(value, (dict, ml_collections.ConfigDict))


def _items(mapping):
  """`(key, value)` pairs of a dict or ConfigDict; a ConfigDict's own
  iteration sorts its keys, which fails on mixed str and int keys."""
  if isinstance(mapping, ml_collections.ConfigDict):
    return list(mapping._fields.items())  # pylint: disable=protected-access
  return list(mapping.items())


def check_config(config):
  """Checks `class_weight` and `sampling`; reads no data."""
  errors.check_choice('sampling', config.sampling, SAMPLINGS)
  class_weight = config.class_weight
  if class_weight is None or class_weight == BALANCED:
    return
  if not _is_mapping(class_weight) or not _items(class_weight):
    raise errors.ConfigError(
        "class_weight must be None, 'balanced' or a non-empty mapping "
        '{class name or class id: weight}, e.g. '
        "--config.class_weight=\"{'cat': 2.0}\". Received: "
        f'class_weight={class_weight!r}')
  keys = [key for key, _ in _items(class_weight)]
  names = [key for key in keys if isinstance(key, str)]
  ids = [key for key in keys
         if isinstance(key, int) and not isinstance(key, bool)]
  if len(names) + len(ids) != len(keys) or (names and ids):
    raise errors.ConfigError(
        'The keys of class_weight must be all class names (str) or all class '
        f'ids (int), not a mix. Received: class_weight={_plain(class_weight)}')
  negative = [key for key in ids if key < 0]
  if negative:
    # Python's negative indexing would weight the last classes instead.
    raise errors.ConfigError(
        f'Class ids are >= 0; class_weight has {negative}. Received: '
        f'class_weight={_plain(class_weight)}')
  float32 = np.finfo(np.float32)
  for key, weight in _items(class_weight):
    if not (errors.is_number(weight) and math.isfinite(weight) and
            float32.tiny <= weight <= float32.max):
      # The sample weights are float32: a larger weight is inf there (an
      # infinite loss), a smaller positive one 0 or subnormal.
      raise errors.ConfigError(
          'Each class weight must be a finite number > 0 within float32 '
          f'({float32.tiny:.3g} to {float32.max:.3g}). Received: '
          f'class_weight[{key!r}]={weight!r}')


def _plain(mapping):
  return dict(_items(mapping))


def needs_counts(config):
  """Whether the run needs the train split's class counts."""
  return config.class_weight == BALANCED or config.sampling == BALANCED


def count_tfds_labels(builder, split, num_classes):
  """Examples per class in a tfds split: one pass over its labels.

  The images are not decoded (`tfds.decode.SkipDecoding`), but every record
  is still read: on ImageNet-sized data that is a pass over the files, so
  its time is logged.

  Returns:
    int64 `[num_classes]` counts.
  """
  image_key, label_key = builder.info.supervised_keys
  start = time.monotonic()
  records = builder.as_dataset(
      split=split, shuffle_files=False,
      decoders={image_key: tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False))
  def label_of(record):
    return record[label_key]

  labels = records.map(label_of, num_parallel_calls=tf.data.AUTOTUNE)
  counts = np.zeros(num_classes, np.int64)
  for batch in labels.batch(65_536).as_numpy_iterator():
    counts += np.bincount(batch, minlength=num_classes)[:num_classes]
  logging.info('Counted the classes of split %r: %d labels read in %.1f s.',
               split, int(counts.sum()), time.monotonic() - start)
  return counts


def class_weights(class_weight, counts, class_names):
  """The weight of each class id, or None when `class_weight` is None.

  Args:
    class_weight: None, 'balanced' or {class name or class id: weight}
      (checked by `check_config`). A string key that is not a class name
      but a number is a class id (JSON turns int keys into strings).
    counts: Examples per class in the train split (needed for 'balanced').
    class_names: One name per class id.

  Returns:
    float64 `[num_classes]`, or None.

  Raises:
    ConfigError: a key names no class.
  """
  if class_weight is None:
    return None
  num_classes = len(class_names)
  if class_weight == BALANCED:
    counts = np.asarray(counts, np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    # scikit-learn's compute_class_weight('balanced', classes=present ones).
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights
  weights = np.ones(num_classes)
  named = {}
  ids = {name: index for index, name in enumerate(class_names)}
  for key, weight in _items(class_weight):
    if isinstance(key, int) and ids.get(str(key), key) != key:
      # The stored config (JSON) turns the id 2 into '2', which would name
      # another class when the run's config is read back.
      raise errors.ConfigError(
          f'class_weight key {key!r} is ambiguous: the class named '
          f'{str(key)!r} has id {ids[str(key)]}, not {key}. Give the keys as '
          f'class names (str). Received: class_weight={_plain(class_weight)}')
    if isinstance(key, str) and key in ids:
      index = ids[key]
    elif isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
      index = int(key)
      if index >= num_classes:
        raise errors.ConfigError(
            f'class_weight names class id {index}, but the data has '
            f'{num_classes} classes (ids 0..{num_classes - 1}). Received: '
            f'class_weight={_plain(class_weight)}')
    else:
      raise errors.ConfigError(
          f'class_weight names the class {key!r}, which the data does not '
          f'have. Its classes: {list(class_names)[:20]}. Received: '
          f'class_weight={_plain(class_weight)}')
    if index in named:
      # E.g. {'cat': 2.0, '0': 3.0}: one would silently win.
      raise errors.ConfigError(
          f'class_weight gives the class {class_names[index]!r} (id '
          f'{index}) twice, as {named[index]!r} and {key!r}. Give each class '
          f'once. Received: class_weight={_plain(class_weight)}')
    named[index] = key
    weights[index] = float(weight)
  return weights


def log_classes(counts, weights, class_names, sampling):
  """Logs the split's class counts, the class weights and the sampling."""
  if len(counts):
    counts = np.asarray(counts)
    present = counts[counts > 0]
    logging.info(
        'Train split classes: %s (largest/smallest %.1f).',
        dict(zip(class_names, counts.tolist())),
        present.max() / present.min() if len(present) else float('nan'))
  if weights is not None:
    logging.info('Class weights (per-example sample weights): %s',
                 dict(zip(class_names, np.round(weights, 6).tolist())))
  logging.info('Training sampling: %s.', sampling)
  if weights is not None and sampling == BALANCED:
    logging.warning(
        "class_weight and sampling='balanced' both correct the imbalance: "
        'their effects multiply.')


def sample_weights(labels, weights):
  """Per-example weights of a batch: w[label], or Σ_c y_c·w_c for soft rows.

  Args:
    labels: int `[N]` class ids or float `[N, num_classes]` soft labels.
    weights: float `[num_classes]` class weights.

  Returns:
    float32 `[N]`.
  """
  weights = tf.constant(weights, tf.float32)
  if labels.shape.rank == 2:
    return tf.linalg.matvec(tf.cast(labels, tf.float32), weights)
  return tf.gather(weights, tf.cast(labels, tf.int32))


def with_sample_weights(batches, weights):
  """`(images, labels)` batches become `(images, labels, sample_weights)`."""
  def weighted(images, labels):
    return images, labels, sample_weights(labels, weights)

  return batches.map(weighted, num_parallel_calls=tf.data.AUTOTUNE)


def class_stream_seed(seed, class_id, epoch):
  """A shuffle seed per (seed, class, epoch), without collisions."""
  return int(np.random.SeedSequence([seed, class_id, epoch])
             .generate_state(1, np.uint32)[0])


def balanced_stream(examples, counts, seed, endless_shuffle):
  """An endless stream of examples in which every class is equally likely.

  Args:
    examples: `(image, label)` examples (decoded, un-augmented), read once
      per class stream (each keeps the examples of its class).
    counts: Examples per class; classes without any are left out (a
      filtered empty stream would be scanned forever).
    seed: The run's seed.
    endless_shuffle: `endless_shuffle(class_examples, count, seed_of_epoch)`
      returns the endless seeded stream of one class (the pipeline's own
      per-epoch shuffle).

  Returns:
    The interleaved stream; deterministic for a seed, so it can be skipped
    to any position like the 'shuffle' stream.
  """
  present = [int(c) for c in np.flatnonzero(np.asarray(counts) > 0)]
  streams = []
  for class_id in present:
    class_examples = examples.filter(
        lambda image, label, class_id=class_id: tf.equal(
            tf.cast(label, tf.int64), class_id))
    streams.append(endless_shuffle(
        class_examples, int(counts[class_id]),
        lambda epoch, class_id=class_id: class_stream_seed(seed, class_id,
                                                           epoch)))
  logging.info(
      "sampling='balanced': %d class streams, each filtering the train split "
      'and caching its class (with cache=True): the first pass reads and '
      'decodes the split %d times; with cache=False every pass of a class '
      'does.', len(streams), len(streams))
  return tf.data.Dataset.sample_from_datasets(
      streams, weights=[1.0 / len(streams)] * len(streams),
      # The selector's own seed: id num_classes is no class's.
      seed=class_stream_seed(seed, len(counts), 0),
      stop_on_empty_dataset=False)
