"""Cross-entropy on sparse or soft labels, with optional label smoothing.

Keras' `SparseCategoricalCrossentropy` has no `label_smoothing`, and MixUp and
CutMix produce soft (one-hot mixed) labels. `CrossEntropy` takes either:
class ids `[N]` or `[N, 1]` (as for Keras' sparse cross-entropy) are one-hot
encoded, `[N, C]` distributions are used as they are (`is_soft` decides, by
shape, for the loss and the metrics alike); then, with smoothing ε over C classes, the target is
`(1 - ε)·y + ε / C` (Szegedy et al. 2016), and the loss is
`-Σ_c target_c · log softmax(logits)_c`, averaged over the batch.

Metrics that need class ids (accuracy, top-k) take `hard_labels(y)`: the
argmax of soft labels, the ids themselves otherwise.
"""

import keras
import tensorflow as tf

from keras_sft import errors


def check_config(config):
  """Checks the loss keys of the config."""
  errors.check_fraction('label_smoothing', config.label_smoothing)


@keras.saving.register_keras_serializable(package='keras_sft')
class CrossEntropy(keras.losses.Loss):
  """From-logits cross-entropy on class ids or soft labels.

  Args:
    label_smoothing: ε in [0, 1).
    **kwargs: Passed to `keras.losses.Loss` (`name`, `reduction`).
  """

  def __init__(self, label_smoothing=0.0, name='cross_entropy', **kwargs):
    super().__init__(name=name, **kwargs)
    errors.check_fraction('label_smoothing', label_smoothing)
    self.label_smoothing = float(label_smoothing)

  def call(self, y_true, y_pred):
    y_pred = tf.cast(y_pred, tf.float32)
    num_classes = tf.shape(y_pred)[-1]
    sparse = not is_soft(y_true, y_pred.shape.rank)
    if sparse and not self.label_smoothing:
      # Bit for bit what SparseCategoricalCrossentropy(from_logits=True)
      # computes, so runs without the recipe train exactly as before.
      return keras.losses.sparse_categorical_crossentropy(
          y_true, y_pred, from_logits=True)
    if not sparse:
      targets = tf.cast(y_true, tf.float32)
    else:  # Class ids, possibly [N, 1].
      ids = tf.cast(tf.reshape(y_true, tf.shape(y_pred)[:-1]), tf.int32)
      targets = tf.one_hot(ids, num_classes, dtype=tf.float32)
    if self.label_smoothing:
      targets = (targets * (1.0 - self.label_smoothing) +
                 self.label_smoothing / tf.cast(num_classes, tf.float32))
    return -tf.reduce_sum(targets * tf.nn.log_softmax(y_pred), axis=-1)

  def get_config(self):
    config = super().get_config()
    config['label_smoothing'] = self.label_smoothing
    return config


def is_soft(y_true, num_dims):
  """Whether `y_true` holds distributions `[N, C]` rather than class ids.

  Ids are `[N]`, or `[N, 1]` (the rank of the logits, one column); a soft
  label has the rank of the logits and a last dimension other than 1. Not
  the rank alone: `[N, 1]` ids would be taken for a one-class distribution.

  Args:
    y_true: `[N]` or `[N, 1]` ids, or `[N, C]` soft labels.
    num_dims: Rank of the predictions (2 for `[N, C]` logits).
  """
  return y_true.shape.rank == num_dims and y_true.shape[-1] != 1


def hard_labels(y_true, num_dims):
  """Returns class ids: `y_true` itself, or its argmax if it is soft.

  Args:
    y_true: `[N]` (or `[N, 1]`) ids, or `[N, C]` soft labels.
    num_dims: Rank of the predictions (2 for `[N, C]` logits).
  """
  if is_soft(y_true, num_dims):
    return tf.argmax(y_true, axis=-1)
  return y_true
