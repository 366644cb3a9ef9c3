"""FixMatch (Sohn et al. 2020) on top of the `Classifier`'s train step.

Each training step gets a batch of B labelled images and μ·B unlabelled
images, each of the latter twice: a weak view (the per-image flip and crop
of labelled images) and a strong view (that, then RandAugment and cutout;
`keras_sft.data.unlabeled`). The loss differentiated is

    CE(labelled) + λ·R(θ) + λ_u · (1 / μB) Σ_b 1[max p_b ≥ τ] · CE(p̂_b, q_b)

where p_b = softmax of the weak view's logits under `tf.stop_gradient`,
p̂_b = argmax p_b (the pseudo-label) and q_b the strong view's logits.
The sum is divided by μB, every unlabelled image of the batch, not by the
count above the threshold: FixMatch's normalization, so the term grows as
the model becomes confident. Under `tf.distribute` each replica takes the
mean over its own μB / N images and the term is divided by the replica
count exactly once, as Keras divides the compiled loss; the summed
gradient is then that of the global mean.

BatchNormalization: labelled, weak and strong images go through the network
in one forward pass (concatenated, as FixMatch's reference code does), so a
trained BN layer normalizes each with the statistics of all three and its
moving statistics follow that mix. (Precise BN, when on, re-estimates them
from labelled training batches only: `train._statistics_batches`.)

The step itself is the `Classifier`'s, unchanged (replica scaling of λ·R,
staged fine-tuning, loss scaling, seeding); this class only changes what
the forward pass sees (`call` on the input dict) and what the loss adds
(`_split_loss`). The unlabelled logits travel from one to the other in a
thread-local slot: under MirroredStrategy each replica traces the step in
its own thread.

Logs `unlabeled_mask_rate` (fraction of unlabelled images whose confidence
is ≥ τ) and `unlabeled_ce` (the mean of mask · CE over the unlabelled
images, before λ_u) per epoch. `loss` stays CE + λ·R, comparable with a
supervised run and with `val_loss`.
"""

import threading

import keras
import tensorflow as tf
from keras.src.losses import loss as loss_module

from keras_sft.data import unlabeled as unlabeled_data
from keras_sft import errors
from keras_sft.models import classifier

# The input dict of a training step with unlabelled images (the input
# pipeline's contract: `pipeline.Data.train`).
LABELED = unlabeled_data.LABELED
WEAK = unlabeled_data.WEAK
STRONG = unlabeled_data.STRONG
# Metric names; reported by training only (see `evaluate`).
MASK_RATE = 'unlabeled_mask_rate'
UNLABELED_CE = 'unlabeled_ce'


def unlabeled_loss(weak_logits, strong_logits, threshold):
  """FixMatch's unlabelled term and mask, for one replica's images.

  Args:
    weak_logits: `[U, classes]` logits of the weak views.
    strong_logits: `[U, classes]` logits of the strong views.
    threshold: τ; pseudo-labels of weak views whose largest probability is
      below it are masked out.

  Returns:
    `(loss, mask)`: float32 scalar Σ mask · CE(pseudo-label, strong) / U
    (0 when U = 0), and the float32 `[U]` mask. No gradient flows into
    `weak_logits`.
  """
  weak = tf.stop_gradient(tf.cast(weak_logits, tf.float32))
  probabilities = tf.nn.softmax(weak, axis=-1)
  pseudo_labels = tf.argmax(probabilities, axis=-1)
  mask = tf.cast(tf.reduce_max(probabilities, axis=-1) >= threshold,
                 tf.float32)
  cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=pseudo_labels, logits=tf.cast(strong_logits, tf.float32))
  count = tf.maximum(tf.cast(tf.shape(mask)[0], tf.float32), 1.0)
  return tf.reduce_sum(mask * cross_entropy) / count, mask


@keras.saving.register_keras_serializable(package='keras_sft')
class FixMatchClassifier(classifier.Classifier):
  """A `Classifier` whose training batches may carry unlabelled images.

  A training batch is `({'images': labelled, 'unlabeled_weak': weak,
  'unlabeled_strong': strong}, labels)`; a plain `(images, labels)` batch
  (evaluation, precise BN) is handled as by `Classifier`.

  Args:
    network: A `keras.Model` mapping images to logits.
    threshold: τ in (0, 1].
    unlabeled_weight: λ_u >= 0.
    **kwargs: Passed to `Classifier`.
  """

  def __init__(self, network, threshold=0.95, unlabeled_weight=1.0,
               **kwargs):
    super().__init__(network, **kwargs)
    unlabeled_data.check_threshold(threshold)
    errors.check_non_negative('fixmatch_unlabeled_weight', unlabeled_weight)
    self.threshold = float(threshold)
    self.unlabeled_weight = float(unlabeled_weight)
    self.mask_rate_tracker = keras.metrics.Mean(name=MASK_RATE)
    self.unlabeled_ce_tracker = keras.metrics.Mean(name=UNLABELED_CE)
    # Not an attribute Keras tracks: it holds tensors of one trace.
    object.__setattr__(self, '_slot', threading.local())

  def call(self, inputs, training=None):
    if not isinstance(inputs, dict):
      return self.network(inputs, training=training)
    labeled = inputs[LABELED]
    if not training:
      return self.network(labeled, training=training)
    weak, strong = inputs[WEAK], inputs[STRONG]
    # One pass: BatchNormalization sees labelled, weak and strong images.
    logits = self.network(
        tf.concat([labeled, tf.cast(weak, labeled.dtype),
                   tf.cast(strong, labeled.dtype)], axis=0),
        training=training)
    size, unlabeled = tf.shape(labeled)[0], tf.shape(weak)[0]
    self._slot.logits = (logits[size:size + unlabeled],
                         logits[size + unlabeled:])
    return logits[:size]

  def _split_loss(self, x, y, y_pred, sample_weight, training):
    total, ce, l2 = super()._split_loss(x, y, y_pred, sample_weight, training)
    logits = getattr(self._slot, 'logits', None)
    self._slot.logits = None
    if logits is None:
      return total, ce, l2
    unlabeled_ce, mask = unlabeled_loss(*logits, self.threshold)
    # Each replica's mean over its own images; Keras sums the replicas'
    # gradients, so the term is divided by the replica count once.
    total += loss_module.scale_loss_for_distribution(
        self.unlabeled_weight * unlabeled_ce)
    count = tf.cast(tf.shape(mask)[0], tf.float32)
    self.mask_rate_tracker.update_state(
        tf.reduce_sum(mask) / tf.maximum(count, 1.0), sample_weight=count)
    self.unlabeled_ce_tracker.update_state(unlabeled_ce, sample_weight=count)
    return total, ce, l2

  def _update_trackers(self, x, ce, l2):
    if isinstance(x, dict):
      x = x[LABELED]
    super()._update_trackers(x, ce, l2)

  def evaluate(self, *args, **kwargs):
    """`Classifier.evaluate` without the unlabelled metrics (training only:
    evaluation would report their untouched zeros)."""
    results = super().evaluate(*args, **kwargs)
    if isinstance(results, dict):
      results = {key: value for key, value in results.items()
                 if key not in (MASK_RATE, UNLABELED_CE)}
    return results

  def get_config(self):
    config = super().get_config()
    config.update({'threshold': self.threshold,
                   'unlabeled_weight': self.unlabeled_weight})
    return config
