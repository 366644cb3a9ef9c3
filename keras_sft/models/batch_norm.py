"""BatchNormalization as one fused kernel, for the TensorFlow backend.

Keras 3 computes BatchNormalization from separate ops (moments, then the
normalization, each a pass over the activations, and more of them backward),
where Keras 2 called TensorFlow's fused kernel (`FusedBatchNormV3`: oneDNN on
CPUs, cuDNN on GPUs, also lowered by XLA). ResNet50 has 53 such layers, so
the kernel matters for its step time (README "Performance").

`BatchNormalization` here is Keras' layer with the same variables, config and
arithmetic, where the fused kernel applies (4-D channels-last inputs, with
scale and center, no mask, renorm or cross-replica `synchronized` statistics);
elsewhere it runs Keras' own code. One difference in the kernel is undone:
in training it returns the Bessel-corrected batch variance, Keras updates the
moving variance with the biased one.

It keeps Keras' class name on purpose: Keras names a layer's entry in a
`.weights.h5` file after its class, so weight files move both ways between
this layer and Keras' (a ResNet50 trained here loads into
`keras.applications.ResNet50(weights=path)`, and the other way round).

`fuse(model)` returns a copy of a functional model whose BatchNormalization
layers are fused, with the same weights.
"""

import contextlib
import threading

import keras
import tensorflow as tf

# Per thread (tf.distribute runs each replica in its own thread): the list
# that `collect_statistics` opened, or None.
_collecting = threading.local()


@contextlib.contextmanager
def collect_statistics():
  """Records the input statistics of every BN layer called in training mode.

  Yields a list that fills with `(layer, count, mean, m2)` per call, in call
  order: the count of elements per channel, their mean and sum of squared
  deviations, float32 `[C]` tensors (`keras_sft.models.precise_bn` uses them).
  """
  previous = getattr(_collecting, 'entries', None)
  _collecting.entries = []
  try:
    yield _collecting.entries
  finally:
    _collecting.entries = previous


def _record_statistics(layer, inputs):
  entries = getattr(_collecting, 'entries', None)
  if entries is None:
    return
  inputs = tf.cast(inputs, tf.float32)
  rank = len(inputs.shape)
  channel_axis = layer.axis % rank
  axes = [axis for axis in range(rank) if axis != channel_axis]
  mean = tf.reduce_mean(inputs, axis=axes, keepdims=True)
  m2 = tf.reduce_sum(tf.square(inputs - mean), axis=axes)
  count = tf.cast(tf.size(inputs, out_type=tf.int64) //
                  tf.cast(tf.shape(inputs)[channel_axis], tf.int64),
                  tf.float32)
  entries.append((layer, count, tf.reshape(mean, [-1]), m2))


@keras.saving.register_keras_serializable(package='keras_sft')
class BatchNormalization(keras.layers.BatchNormalization):
  """`keras.layers.BatchNormalization` on TensorFlow's fused kernel."""

  def _fusable(self, inputs, mask):
    return (mask is None and len(inputs.shape) == 4
            and self.axis in (-1, 3) and self.scale and self.center
            and not self.renorm and not self.synchronized)

  def call(self, inputs, training=None, mask=None):
    if training and self.trainable:
      _record_statistics(self, inputs)
    if not self._fusable(inputs, mask):
      return super().call(inputs, training=training, mask=mask)
    # As Keras' layer: statistics in float32 also under mixed precision.
    inputs = tf.cast(inputs, tf.float32)
    if training and self.trainable:
      outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
          inputs, self.gamma, self.beta, epsilon=self.epsilon,
          is_training=True)
      # The kernel's variance is Bessel-corrected (divided by n - 1).
      count = _values_per_channel(inputs)
      variance *= (count - 1.0) / tf.maximum(count, 1.0)
      self.moving_mean.assign(self.moving_mean * self.momentum +
                              mean * (1.0 - self.momentum))
      self.moving_variance.assign(self.moving_variance * self.momentum +
                                  variance * (1.0 - self.momentum))
    else:
      outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
          inputs, self.gamma, self.beta, mean=self.moving_mean,
          variance=self.moving_variance, epsilon=self.epsilon,
          is_training=False)
    return tf.cast(outputs, self.compute_dtype)


def _values_per_channel(inputs):
  """N·H·W: the values behind each channel's batch statistics, as float32.

  In int64: an int32 `tf.size` overflows past 2^31 values (conv1 of ResNet50
  at 384 px with 1,000 images per replica has 2.36e9), silently when the
  shape is static (a negative count, then a negative moving variance).
  """
  shape = tf.shape(inputs, out_type=tf.int64)
  return tf.cast(tf.reduce_prod(shape[:-1]), tf.float32)


def _fused_clone(layer):
  if type(layer) is keras.layers.BatchNormalization:  # pylint: disable=unidiomatic-typecheck
    return BatchNormalization.from_config(layer.get_config())
  return layer.__class__.from_config(layer.get_config())


def fuse(model):
  """Returns a copy of functional `model` with fused BatchNormalization.

  Layer names, trainable flags, BatchNorm settings and weights are kept.

  Args:
    model: A functional `keras.Model`, such as `keras.applications.ResNet50`.
  """
  fused = keras.models.clone_model(model, clone_function=_fused_clone)
  fused.set_weights(model.get_weights())
  return fused
