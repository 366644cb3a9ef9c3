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

`weight_decay_target='pretrained'` (L2-SP, Li et al. 2018) decays each
backbone kernel toward its value when the `Classifier` was built (the
pretrained weights): R(θ) = Σ‖w − w₀‖² over the backbone's decayed kernels
plus Σ‖w‖² over the head's. The w₀ are non-trainable variables of the
`Classifier` ("anchors"), so every backup holds them and a resumed run decays
toward the same values; exports leave them out (`serving_variables`).

`clip_global_norm=c` rescales the gradient g of the whole loss (CE + λ·R) by
min(1, c / ‖g‖), where ‖g‖ is the global norm of the gradient summed over
replicas (all-reduced here, so 1 and N replicas clip alike; Keras'
`global_clipnorm` clips each replica's own gradient before its all-reduce)
and unscaled (the loss scale of mixed_float16 divided out). The norm is that
of the gradient the phase trains: in the head-only phase the backbone's
gradient (× 0) is not in it; `backbone_multiplier` scales the backbone's
share after clipping, so it stays exactly an SGD learning-rate multiplier.
A norm whose square overflows float32 is computed again on g / max|g|; a
gradient with a NaN or inf entry clips nothing (the step is then skipped
under loss scaling, or caught by the divergence check). It costs one more all-reduce of
the gradients per step on several replicas.

`gradient_accumulation_steps=k` splits each replica's batch into k
micro-batches inside one train step (run in turn) and applies the mean of
their gradients once: one optimizer step, one step of `step_counter`, of the LR
schedule and of the EMA per batch, as without accumulation. It equals the
step on the whole batch except for BatchNormalization's batch statistics,
which are those of each micro-batch (and the moving statistics take k
updates per step).
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


WEIGHT_DECAY_TARGETS = ('zero', 'pretrained')


def l2_penalty(variables, anchors=None):
  """Returns Σ‖w − w₀‖² over `variables`, computed in float32.

  Args:
    variables: The decayed variables.
    anchors: None (every w₀ = 0), or one w₀ per variable: a variable of the
      same shape, or None for 0.
  """
  if not variables:
    return tf.constant(0.0, tf.float32)
  if anchors is None:
    anchors = [None] * len(variables)
  terms = []
  for variable, anchor in zip(variables, anchors):
    difference = tf.cast(variable, tf.float32)
    if anchor is not None:
      difference -= tf.cast(anchor, tf.float32)
    # tf.nn.l2_loss(w) = Σw²/2 in one fused kernel, and its gradient is w:
    # no squared copy of every kernel is materialized, forward or backward.
    terms.append(tf.nn.l2_loss(difference))
  return 2.0 * tf.add_n(terms)


def serving_variables(model):
  """The variables of `model` an export keeps: all but L2-SP's anchors."""
  anchors = {id(anchor) for anchor in getattr(model, 'anchors', {}).values()}
  return [variable for variable in model.variables
          if id(variable) not in anchors]


def check_config(config):
  """Checks λ, its target, clipping, accumulation and the staged keys."""
  errors.check_non_negative('weight_decay', config.weight_decay)
  errors.check_choice('weight_decay_target', config.weight_decay_target,
                      WEIGHT_DECAY_TARGETS)
  if config.weight_decay_target == 'pretrained' and config.weights is None:
    raise errors.ConfigError(
        "weight_decay_target='pretrained' decays the backbone toward its "
        'pretrained weights, but weights=None starts from random ones: '
        'that would pull the backbone back to its random initialization. '
        "Received: weight_decay_target='pretrained', weights=None. Use "
        "weight_decay_target='zero', or set weights.")
  errors.check_positive('clip_global_norm', config.clip_global_norm,
                        optional=True)
  errors.check_integer('gradient_accumulation_steps',
                       config.gradient_accumulation_steps, 1)
  check_micro_batches(config.global_batch_size,
                      config.gradient_accumulation_steps)
  errors.check_non_negative('backbone_learning_rate_multiplier',
                            config.backbone_learning_rate_multiplier)
  if not (errors.is_number(config.head_only_epochs) and
          0 <= config.head_only_epochs < config.num_epochs):
    raise errors.ConfigError(
        'head_only_epochs must be in [0, num_epochs). Received: '
        f'head_only_epochs={config.head_only_epochs!r}, '
        f'num_epochs={config.num_epochs!r}')


def check_micro_batches(global_batch_size, gradient_accumulation_steps,
                        num_replicas=1):
  """Each replica's batch must split into whole micro-batches."""
  per_replica = global_batch_size // num_replicas
  if per_replica % gradient_accumulation_steps:
    raise errors.ConfigError(
        'gradient_accumulation_steps must divide the images each replica '
        f'takes per step (global_batch_size / {num_replicas} replica(s) = '
        f'{per_replica}). Received: gradient_accumulation_steps='
        f'{gradient_accumulation_steps}, global_batch_size='
        f'{global_batch_size}. Use a divisor of {per_replica}.')


@keras.saving.register_keras_serializable(package='keras_sft')
class Classifier(keras.Model):
  """Wraps a network and trains it on cross-entropy + λ·Σ‖w − w₀‖².

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
    weight_decay_target: 'zero' (w₀ = 0) or 'pretrained' (L2-SP: w₀ of a
      backbone kernel is its value now, when the `Classifier` is built; the
      head's w₀ stays 0).
    clip_global_norm: None, or c > 0: the gradient is scaled by
      min(1, c / ‖g‖), ‖g‖ its global norm over all replicas, unscaled.
    gradient_accumulation_steps: k >= 1 micro-batches per optimizer step;
      each replica's batch must divide into k.
    **kwargs: Passed to `keras.Model`.
  """

  def __init__(self, network, weight_decay=0.0, backbone_multiplier=1.0,
               head_only_steps=0, head_layer='head', weight_decay_target='zero',
               clip_global_norm=None, gradient_accumulation_steps=1,
               **kwargs):
    super().__init__(**kwargs)
    errors.check_non_negative('weight_decay', weight_decay)
    errors.check_non_negative('backbone_multiplier', backbone_multiplier)
    errors.check_non_negative('head_only_steps', head_only_steps)
    errors.check_choice('weight_decay_target', weight_decay_target,
                        WEIGHT_DECAY_TARGETS)
    errors.check_positive('clip_global_norm', clip_global_norm, optional=True)
    errors.check_integer('gradient_accumulation_steps',
                         gradient_accumulation_steps, 1)
    self.network = network
    self.weight_decay = float(weight_decay)
    self.backbone_multiplier = float(backbone_multiplier)
    self.head_only_steps = int(head_only_steps)
    self.head_layer = head_layer
    self.weight_decay_target = weight_decay_target
    self.clip_global_norm = (None if clip_global_norm is None else
                             float(clip_global_norm))
    self.gradient_accumulation_steps = int(gradient_accumulation_steps)
    self.ce_tracker = keras.metrics.Mean(name='ce')
    self.l2_tracker = keras.metrics.Mean(name='l2')
    # Training batches taken, skipped optimizer steps included (a loss-scaled
    # step skipped on an overflow still consumed its batch): the run's
    # position, saved with the weights. Advanced once per global step, as
    # Keras' own `optimizer.iterations`.
    self.step_counter = self.add_weight(
        shape=(), initializer='zeros', dtype='int64', trainable=False,
        aggregation='only_first_replica', name='step_counter')
    # After step_counter, so backups of 'zero' runs keep their layout.
    self.anchors = self._create_anchors()

  def _head_variable_ids(self):
    return {id(v) for v in self.network.get_layer(self.head_layer).weights}

  def _create_anchors(self):
    """L2-SP's w₀: a non-trainable copy of each decayed backbone kernel.

    Returns:
      A dict from a kernel's path to its anchor; empty for 'zero'.
    """
    if self.weight_decay_target != 'pretrained':
      return {}
    head = self._head_variable_ids()
    anchors = {}
    for kernel in decayed_variables(self.network):
      if id(kernel) in head:
        continue
      anchor = self.add_weight(
          shape=kernel.shape, dtype=kernel.dtype, trainable=False,
          initializer='zeros', name='anchor_' + kernel.path.replace('/', '_'))
      anchor.assign(kernel.value)
      anchors[kernel.path] = anchor
    return anchors

  def call(self, inputs, training=None):
    return self.network(inputs, training=training)

  def regularization(self):
    """Returns λ·R(θ) as a float32 scalar (not divided by replicas)."""
    if not self.weight_decay:  # Skips the sum over every kernel.
      return tf.constant(0.0, tf.float32)
    kernels = decayed_variables(self.network)
    if not self.anchors:
      return self.weight_decay * l2_penalty(kernels)
    head = self._head_variable_ids()
    missing = [k.path for k in kernels
               if id(k) not in head and k.path not in self.anchors]
    if missing:
      # A backbone kernel made trainable after the Classifier was built has
      # no w₀: decaying it toward 0 instead would be silent.
      raise ValueError(
          f'No pretrained value (L2-SP anchor) for {missing[:3]}: with '
          "weight_decay_target='pretrained', make layers trainable before "
          'building the Classifier.')
    return self.weight_decay * l2_penalty(
        kernels, [self.anchors.get(k.path) for k in kernels])

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
    the backup; setting the draws to the step counter (× the micro-batches
    per step, which draw in turn) before each step gives step n the masks of
    step n of an uninterrupted run, resumed or not.
    """
    draws = self.step_counter.value * self.gradient_accumulation_steps
    for layer in self.network._flatten_layers(include_self=False):  # pylint: disable=protected-access
      for generator in getattr(layer, '_seed_generators', ()):
        state = generator.state
        state.assign(tf.stack([state.value[0], tf.cast(draws, state.dtype)]))

  def _micro_step(self, data, variables):
    """Forward and backward on one (micro-)batch; updates the metrics.

    Returns:
      The gradients of the (loss-scaled) total loss of this batch.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
      y_pred = self(x, training=True)
      total, ce, l2 = self._split_loss(x, y, y_pred, sample_weight,
                                       training=True)
      # Multiplies by the loss scale under mixed_float16; identity otherwise.
      scaled = self.optimizer.scale_loss(total)
    self._update_trackers(x, ce, l2)
    # Accuracy metrics need class ids; MixUp/CutMix labels are soft.
    self.compute_metrics(x, losses.hard_labels(y, y_pred.shape.rank),
                         y_pred, sample_weight=sample_weight)
    return tape.gradient(scaled, variables)

  def _accumulated_gradients(self, data, variables):
    """The sum of the k micro-batches' gradients (k = 1: the batch's own).

    Micro-batch i holds rows [i·b, (i + 1)·b) of the replica's batch of k·b
    rows. The k forward and backward passes are unrolled in the graph, each
    micro-batch's slice of the input depending on the previous one's
    gradients, so they run one after another and one micro-batch's
    activations are alive at a time. (A `tf.while_loop` failed on ResNet50:
    Grappler's rewrite of its gradient sums into temporary variables raised
    AlreadyExistsError in the loop.)
    """
    k = self.gradient_accumulation_steps
    if k == 1:
      return self._micro_step(data, variables)
    rows = tf.shape(tf.nest.flatten(data)[0])[0]
    tf.debugging.assert_equal(
        rows % k, 0, message='gradient_accumulation_steps must divide each '
        "replica's batch")
    size = rows // k
    sums = None
    for index in range(k):
      previous = [] if sums is None else [g for g in sums if g is not None]
      with tf.control_dependencies(previous):
        micro_batch = tf.nest.map_structure(
            lambda t, i=index: None if t is None else
            t[i * size:(i + 1) * size], data)
      gradients = self._micro_step(micro_batch, variables)
      sums = gradients if sums is None else [
          None if total is None else total + more
          for total, more in zip(sums, gradients)]
    return sums

  def train_step(self, data):
    variables = self.trainable_variables
    self._seed_random_layers()
    gradients = self._accumulated_gradients(data, variables)
    gradients = self._scale_gradients(gradients, variables)
    gradients = self._skip_together(gradients)
    # Unscales (and skips non-finite steps) under loss scaling.
    self.optimizer.apply(gradients, variables)
    self.step_counter.assign_add(1)
    return self.get_metrics_result()

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

  def head_only_phase(self):
    """1.0 while only the head trains, else 0.0 (a float32 scalar)."""
    if not self.head_only_steps:
      return tf.constant(0.0, tf.float32)
    return tf.cast(tf.less(self.optimizer.iterations, self.head_only_steps),
                   tf.float32)

  def backbone_scale(self):
    """The current backbone gradient multiplier, a float32 scalar."""
    return (1.0 - self.head_only_phase()) * self.backbone_multiplier

  def _scale_gradients(self, gradients, variables):
    """Averages micro-batches, masks the head-only phase, clips, multiplies.

    Without clipping, the head's gradient is × 1/k and the backbone's
    × `backbone_scale()`/k (each replica's own; the optimizer sums them).
    With clipping, the gradients are summed over replicas here, and each
    replica passes its share 1/N of the clipped sum to the optimizer, which
    sums them again: head × f/(kN), backbone × (1 − phase)·f·m/(kN), with
    f = min(1, c/‖g‖) and ‖g‖ the norm of the summed, unscaled, averaged
    gradient with the backbone's part × (1 − phase).
    """
    k = self.gradient_accumulation_steps
    if (self.clip_global_norm is None and k == 1 and
        self.backbone_multiplier == 1.0 and not self.head_only_steps):
      return gradients
    head = self._head_variable_ids()
    in_head = [id(v) in head for v in variables]
    trains_backbone = 1.0 - self.head_only_phase()
    head_scale = tf.constant(1.0 / k, tf.float32)
    backbone_scale = trains_backbone * self.backbone_multiplier / k
    if self.clip_global_norm is not None:
      gradients = self._sum_over_replicas(gradients)
      replicas = tf.distribute.get_replica_context().num_replicas_in_sync
      factor = self._clip_factor(gradients, in_head, trains_backbone)
      head_scale *= factor / replicas
      backbone_scale *= factor / replicas
    return [
        None if g is None else
        g * tf.cast(head_scale if is_head else backbone_scale, g.dtype)
        for g, is_head in zip(gradients, in_head)
    ]

  def _sum_over_replicas(self, gradients):
    replica_context = tf.distribute.get_replica_context()
    if replica_context is None or replica_context.num_replicas_in_sync == 1:
      return gradients
    present = [i for i, g in enumerate(gradients) if g is not None]
    reduced = replica_context.all_reduce(
        tf.distribute.ReduceOp.SUM, [gradients[i] for i in present])
    gradients = list(gradients)
    for i, value in zip(present, reduced):
      gradients[i] = value
    return gradients

  def _clip_factor(self, gradients, in_head, trains_backbone):
    """min(1, c / ‖g‖) for the summed gradients; 1 if ‖g‖ is not finite.

    ‖g‖² = Σ_head ‖g‖² + (1 − phase)·Σ_backbone ‖g‖², divided by k² (the
    micro-batch mean) and by the loss scale² (the gradients are those of
    the scaled loss). When Σg² overflows float32 (‖g‖ > 1.8e19, or 5.6e14
    under a loss scale of 2^15) with every entry finite, it is computed
    again on g / max|g|, so such a gradient is clipped, not applied whole.
    """
    trains = trains_backbone > 0.0
    counted = [(g, is_head) for g, is_head in zip(gradients, in_head)
               if g is not None]

    def squared_norm(divisor):
      head_sum, backbone_sum = [], []
      for g, is_head in counted:
        (head_sum if is_head else backbone_sum).append(
            2.0 * tf.nn.l2_loss(tf.cast(g, tf.float32) / divisor))
      squared = tf.add_n(head_sum) if head_sum else tf.constant(0.0)
      if backbone_sum:
        # Not 0 × Σ: an overflowed backbone sum would make it NaN.
        squared += tf.where(trains, tf.add_n(backbone_sum), 0.0)
      return squared

    def rescaled_norm():
      largest = tf.constant(0.0)
      for g, is_head in counted:
        g_max = tf.reduce_max(tf.abs(tf.cast(g, tf.float32)))
        if not is_head:
          g_max = tf.where(trains, g_max, 0.0)
        largest = tf.maximum(largest, g_max)
      return largest * tf.sqrt(squared_norm(largest))

    squared = squared_norm(tf.constant(1.0))
    root = tf.cond(tf.math.is_inf(squared), rescaled_norm,
                   lambda: tf.sqrt(squared))
    loss_scale = tf.cast(self.optimizer.scale_loss(tf.constant(1.0)),
                         tf.float32)
    norm = root / (loss_scale * self.gradient_accumulation_steps)
    clipped = tf.minimum(1.0, self.clip_global_norm / norm)
    return tf.where(tf.math.is_finite(norm) & (norm > 0.0), clipped, 1.0)

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
        'weight_decay_target': self.weight_decay_target,
        'clip_global_norm': self.clip_global_norm,
        'gradient_accumulation_steps': self.gradient_accumulation_steps,
    })
    return config

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    network = keras.saving.deserialize_keras_object(
        config.pop('network'), custom_objects=custom_objects)
    return cls(network=network, **config)
