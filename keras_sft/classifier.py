"""A `keras.Model` that trains on cross-entropy + λ·R(θ).

R(θ) = Σ‖w‖² summed over the kernels of the Conv and Dense layers that are
trainable; biases, BatchNorm scales and offsets are not decayed. No ½ is
included, as in `keras.regularizers.L2`: the gradient of λ·R is 2λw.

Under a `tf.distribute` strategy, Keras 3 divides the compiled loss by the
number of replicas in sync and sums the replicas' gradients. R(θ) is the same
on every replica, so the term is divided by the replica count exactly once
here; the summed gradient is then that of λ·R, not N·λ·R.
"""

import keras
import tensorflow as tf
from keras.src.losses import loss as loss_module

from keras_sft import losses

# Layer types whose `kernel` is decayed.
_DECAYED_LAYER_TYPES = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)


def decayed_variables(model):
  """Returns the trainable kernels of Conv and Dense layers in `model`."""
  kernels = []
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if isinstance(layer, _DECAYED_LAYER_TYPES) and layer.kernel.trainable:
      kernels.append(layer.kernel)
  return kernels


def l2_penalty(variables):
  """Returns Σ‖w‖² over `variables`, computed in float32."""
  if not variables:
    return tf.constant(0.0, tf.float32)
  # tf.nn.l2_loss(w) = Σw²/2 in one fused kernel, and its gradient is w:
  # no squared copy of every kernel is materialized, forward or backward.
  return 2.0 * tf.add_n([
      tf.nn.l2_loss(tf.cast(variable, tf.float32)) for variable in variables
  ])


@keras.saving.register_keras_serializable(package='keras_sft')
class Classifier(keras.Model):
  """Wraps a network and trains it on cross-entropy + λ·Σ‖w‖².

  Logs `loss` (the total, not divided by replicas), `ce` (the compiled loss),
  `l2` (λ·R(θ)) and the compiled metrics, in both `fit` and `evaluate`.

  Args:
    network: A `keras.Model` mapping images to logits.
    weight_decay: λ, a non-negative float.
    **kwargs: Passed to `keras.Model`.
  """

  def __init__(self, network, weight_decay=0.0, **kwargs):
    super().__init__(**kwargs)
    if weight_decay < 0:
      raise ValueError(
          f'weight_decay must be >= 0. Received: weight_decay={weight_decay}')
    self.network = network
    self.weight_decay = float(weight_decay)
    self.ce_tracker = keras.metrics.Mean(name='ce')
    self.l2_tracker = keras.metrics.Mean(name='l2')

  def call(self, inputs, training=None):
    return self.network(inputs, training=training)

  def regularization(self):
    """Returns λ·R(θ) as a float32 scalar (not divided by replicas)."""
    if not self.weight_decay:  # Skips the sum over every kernel.
      return tf.constant(0.0, tf.float32)
    return self.weight_decay * l2_penalty(decayed_variables(self.network))

  def _split_loss(self, x, y, y_pred, sample_weight, training):
    """Returns (loss to differentiate, per-replica CE, λ·R)."""
    # Divided by the number of replicas by Keras under a strategy.
    ce = self._compute_loss(x=x, y=y, y_pred=y_pred,
                            sample_weight=sample_weight, training=training)
    ce = tf.cast(ce, tf.float32)
    l2 = self.regularization()
    total = ce + loss_module.scale_loss_for_distribution(l2)
    return total, ce, l2

  def _update_trackers(self, x, ce, l2):
    batch = tf.shape(tf.nest.flatten(x)[0])[0]
    ce = loss_module.unscale_loss_for_distribution(ce)
    self._loss_tracker.update_state(ce + l2, sample_weight=batch)
    self.ce_tracker.update_state(ce, sample_weight=batch)
    self.l2_tracker.update_state(l2, sample_weight=batch)

  def train_step(self, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    variables = self.trainable_variables
    with tf.GradientTape() as tape:
      y_pred = self(x, training=True)
      total, ce, l2 = self._split_loss(x, y, y_pred, sample_weight,
                                       training=True)
      # Multiplies by the loss scale under mixed_float16; identity otherwise.
      scaled = self.optimizer.scale_loss(total)
    gradients = tape.gradient(scaled, variables)
    # Unscales (and skips non-finite steps) under loss scaling.
    self.optimizer.apply(gradients, variables)
    self._update_trackers(x, ce, l2)
    # Accuracy metrics need class ids; MixUp/CutMix labels are soft.
    return self.compute_metrics(x, losses.hard_labels(y, y_pred.shape.rank),
                                y_pred, sample_weight=sample_weight)

  def test_step(self, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    y_pred = self(x, training=False)
    _, ce, l2 = self._split_loss(x, y, y_pred, sample_weight, training=False)
    self._update_trackers(x, ce, l2)
    # Accuracy metrics need class ids; MixUp/CutMix labels are soft.
    return self.compute_metrics(x, losses.hard_labels(y, y_pred.shape.rank),
                                y_pred, sample_weight=sample_weight)

  def get_config(self):
    config = super().get_config()
    config.update({
        'network': keras.saving.serialize_keras_object(self.network),
        'weight_decay': self.weight_decay,
    })
    return config

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    network = keras.saving.deserialize_keras_object(
        config.pop('network'), custom_objects=custom_objects)
    return cls(network=network, **config)
