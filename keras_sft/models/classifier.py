"""A `keras.Model` that trains on cross-entropy + λ·R(θ).

R(θ) = Σ‖w‖² summed over the kernels of the Conv (depthwise included) and
Dense layers that are trainable; biases, BatchNorm and LayerNorm scales and
offsets and ConvNeXt's LayerScale are not decayed (`backbones.FAMILIES` lists
the decayed layer types of each backbone family). No ½ is
included, as in `keras.regularizers.L2`: the gradient of λ·R is 2λw.

Under a `tf.distribute` strategy, Keras 3 divides the compiled loss by the
number of replicas in sync and sums the replicas' gradients. R(θ) is the same
on every replica, so the term is divided by the replica count exactly once
here; the summed gradient is then that of λ·R, not N·λ·R.

Staged fine-tuning scales the gradients of the backbone (every variable not
in the layer named `head_layer`) before the optimizer sees them: by 0 while
`optimizer.iterations < head_only_steps` (head-only phase), by
`backbone_multiplier` after. The phase is read from the optimizer's step, so
a run resumed from a backup is in the right phase, and every variable stays
in the optimizer throughout (backups restore across the boundary). Only
gradients are scaled: a trainable BatchNorm layer of the backbone still
normalizes with batch statistics and updates its moving statistics in the
head-only phase (README "Recipe"). For SGD, with or without momentum, a
gradient multiplier is exactly a learning-rate multiplier (the λ·R gradient
included, so frozen variables are not decayed).
For Adam(W) it is not: Adam normalizes gradient scale away, and its bias
correction counts the head-only steps although the backbone's moments stay
zero in them (the backbone's first steps after would be 3-6x the learning
rate); `check_config` refuses AdamW with either.

Under loss scaling (mixed_float16) on several replicas, a step that
overflows on any replica is skipped on all of them (`_skip_together`).
"""

import keras
import tensorflow as tf
from keras.src.losses import loss as loss_module

from keras_sft import errors
from keras_sft.models import losses

# Layer types whose `kernel` is decayed.
_DECAYED_LAYER_TYPES = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
    # Not Conv subclasses in Keras 3; EfficientNetV2 and MobileNetV3 have
    # them (ConvNeXt's depthwise convolutions are grouped Conv2D layers).
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
)


def decayed_variables(model):
  """Returns the trainable kernels of Conv, DepthwiseConv and Dense layers."""
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


def check_config(config):
  """Checks λ and the staged fine-tuning keys; builds nothing."""
  errors.check_non_negative('weight_decay', config.weight_decay)
  errors.check_non_negative('backbone_learning_rate_multiplier',
                            config.backbone_learning_rate_multiplier)
  if not (errors.is_number(config.head_only_epochs) and
          0 <= config.head_only_epochs < config.num_epochs):
    raise errors.ConfigError(
        'head_only_epochs must be in [0, num_epochs). Received: '
        f'head_only_epochs={config.head_only_epochs!r}, '
        f'num_epochs={config.num_epochs!r}')


@keras.saving.register_keras_serializable(package='keras_sft')
class Classifier(keras.Model):
  """Wraps a network and trains it on cross-entropy + λ·Σ‖w‖².

  Logs `loss` (the total, not divided by replicas), `ce` (the compiled loss),
  `l2` (λ·R(θ)) and the compiled metrics, in both `fit` and `evaluate`.

  Args:
    network: A `keras.Model` mapping images to logits.
    weight_decay: λ, a non-negative float.
    backbone_multiplier: Gradient (= SGD learning-rate) multiplier of the
      variables outside the head, >= 0.
    head_only_steps: Optimizer steps, from 0, during which only the head
      trains (backbone gradients multiplied by 0).
    head_layer: Name of the head layer inside `network`.
    **kwargs: Passed to `keras.Model`.
  """

  def __init__(self, network, weight_decay=0.0, backbone_multiplier=1.0,
               head_only_steps=0, head_layer='head', **kwargs):
    super().__init__(**kwargs)
    errors.check_non_negative('weight_decay', weight_decay)
    errors.check_non_negative('backbone_multiplier', backbone_multiplier)
    errors.check_non_negative('head_only_steps', head_only_steps)
    self.network = network
    self.weight_decay = float(weight_decay)
    self.backbone_multiplier = float(backbone_multiplier)
    self.head_only_steps = int(head_only_steps)
    self.head_layer = head_layer
    self.ce_tracker = keras.metrics.Mean(name='ce')
    self.l2_tracker = keras.metrics.Mean(name='l2')
    # Training batches taken, skipped optimizer steps included (a loss-scaled
    # step skipped on an overflow still consumed its batch): the run's
    # position, saved with the weights. Advanced once per global step, as
    # Keras' own `optimizer.iterations`.
    self.step_counter = self.add_weight(
        shape=(), initializer='zeros', dtype='int64', trainable=False,
        aggregation='only_first_replica', name='step_counter')

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

  def _seed_random_layers(self):
    """Seeds the random layers (Dropout) by (their seed, step counter).

    A `keras.random.SeedGenerator` state is `[seed, draws]` and is not in
    the backup; setting the draws to the step counter before each step gives
    step n the masks of step n of an uninterrupted run, resumed or not.
    """
    for layer in self.network._flatten_layers(include_self=False):  # pylint: disable=protected-access
      for generator in getattr(layer, '_seed_generators', ()):
        state = generator.state
        state.assign(tf.stack(
            [state.value[0], tf.cast(self.step_counter.value, state.dtype)]))

  def train_step(self, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    variables = self.trainable_variables
    self._seed_random_layers()
    with tf.GradientTape() as tape:
      y_pred = self(x, training=True)
      total, ce, l2 = self._split_loss(x, y, y_pred, sample_weight,
                                       training=True)
      # Multiplies by the loss scale under mixed_float16; identity otherwise.
      scaled = self.optimizer.scale_loss(total)
    gradients = tape.gradient(scaled, variables)
    gradients = self._scale_backbone_gradients(gradients, variables)
    gradients = self._skip_together(gradients)
    # Unscales (and skips non-finite steps) under loss scaling.
    self.optimizer.apply(gradients, variables)
    self.step_counter.assign_add(1)
    self._update_trackers(x, ce, l2)
    # Accuracy metrics need class ids; MixUp/CutMix labels are soft.
    return self.compute_metrics(x, losses.hard_labels(y, y_pred.shape.rank),
                                y_pred, sample_weight=sample_weight)

  def _skip_together(self, gradients):
    """Under loss scaling on several replicas, makes them skip together.

    Keras' `LossScaleOptimizer.apply` receives each replica's own gradients
    (they are all-reduced later, inside the inner optimizer) and decides
    "finite or not" from the first local replica's (merge-call path: CPUs,
    or GPUs without XLA) or from each replica's own (XLA on GPUs). So an
    overflow on another replica was applied to every replica's weights, or
    (XLA path, several workers) one replica skipped while the others waited
    in the gradient all-reduce. Here the replicas all-reduce a count of the
    non-finite ones, and if it is positive every replica's smallest
    gradient becomes NaN: all then take Keras' skip branch (no update, loss
    scale halved, step not counted). Finite steps are unchanged (× 1).
    """
    if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
      return gradients
    replica_context = tf.distribute.get_replica_context()
    if replica_context is None or replica_context.num_replicas_in_sync == 1:
      return gradients
    non_finite = 1.0 - tf.cast(self.optimizer.check_finite(gradients),
                               tf.float32)
    non_finite = replica_context.all_reduce(tf.distribute.ReduceOp.SUM,
                                            non_finite)
    dense = [i for i, g in enumerate(gradients) if isinstance(g, tf.Tensor)]
    smallest = min(dense, key=lambda i: gradients[i].shape.num_elements())
    gradients = list(gradients)
    gradients[smallest] *= tf.cast(
        tf.where(non_finite > 0.0, float('nan'), 1.0),
        gradients[smallest].dtype)
    return gradients

  def backbone_scale(self):
    """The current backbone gradient multiplier, a float32 scalar."""
    scale = tf.constant(self.backbone_multiplier, tf.float32)
    if self.head_only_steps:
      in_head_phase = tf.less(self.optimizer.iterations, self.head_only_steps)
      scale = tf.where(in_head_phase, tf.constant(0.0, tf.float32), scale)
    return scale

  def _scale_backbone_gradients(self, gradients, variables):
    if self.backbone_multiplier == 1.0 and not self.head_only_steps:
      return gradients
    head = {id(v) for v in self.network.get_layer(
        self.head_layer).trainable_variables}
    scale = self.backbone_scale()
    return [
        g if g is None or id(v) in head else g * tf.cast(scale, g.dtype)
        for g, v in zip(gradients, variables)
    ]

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
        'backbone_multiplier': self.backbone_multiplier,
        'head_only_steps': self.head_only_steps,
        'head_layer': self.head_layer,
    })
    return config

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    network = keras.saving.deserialize_keras_object(
        config.pop('network'), custom_objects=custom_objects)
    return cls(network=network, **config)
