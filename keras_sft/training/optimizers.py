"""Optimizers (one entry each, with their capabilities) and LR schedules.

An optimizer is one `Optimizer` entry of `OPTIMIZERS`: its constructor from
the config and what it can do, which `check_config` reads to refuse a
combination it cannot honour (instead of name tests elsewhere). Adding one
is an entry here plus its tests.
"""

import dataclasses
from typing import Callable

import keras
import tensorflow as tf

from keras_sft import errors

SCHEDULES = ('cosine', 'step')


def check_config(config):
  """Checks the optimization keys of the config; builds nothing."""
  errors.check_non_negative('learning_rate', config.learning_rate)
  errors.check_positive('learning_rate_batch_size',
                        config.learning_rate_batch_size)
  errors.check_non_negative('warmup_epochs', config.warmup_epochs)
  errors.check_choice('optimizer', config.optimizer, tuple(OPTIMIZERS))
  errors.check_non_negative('momentum', config.momentum)
  errors.check_non_negative('adamw_weight_decay', config.adamw_weight_decay)
  errors.check_fraction('ema_momentum', config.ema_momentum, optional=True)
  errors.check_choice('lr_schedule', config.lr_schedule, SCHEDULES)
  _check_boundary_fractions(config.lr_boundary_fractions)
  errors.check_non_negative('lr_decay_factor', config.lr_decay_factor)
  check_layer_decay(config.layer_decay)
  _check_capabilities(config)


def check_layer_decay(layer_decay):
  """None, or a float in (0, 1]."""
  if layer_decay is None:
    return
  if not (errors.is_number(layer_decay) and 0 < layer_decay <= 1):
    raise errors.ConfigError(
        'layer_decay must be None or in (0, 1]. Received: '
        f'layer_decay={layer_decay!r}')


def _check_capabilities(config):
  """Refuses the staged fine-tuning keys the optimizer cannot honour."""
  entry = OPTIMIZERS[config.optimizer]
  if config.head_only_epochs and not entry.zero_gradient_freezes:
    raise errors.ConfigError(
        f'optimizer={config.optimizer!r} cannot be combined with a head-only '
        f'phase: {entry.zero_gradient_freezes_reason} Received: '
        f'optimizer={config.optimizer!r}, '
        f'head_only_epochs={config.head_only_epochs!r}. '
        'Use optimizer="sgd" or head_only_epochs=0.')
  if (config.backbone_learning_rate_multiplier != 1.0 and
      entry.gradient_scale_invariant):
    # The multiplier scales the backbone's gradients (classifier.py): an
    # LR multiplier only for an update proportional to the gradient.
    raise errors.ConfigError(
        f'optimizer={config.optimizer!r} does not support '
        'backbone_learning_rate_multiplier != 1: its update normalizes the '
        'gradient scale away. Received: backbone_learning_rate_multiplier='
        f'{config.backbone_learning_rate_multiplier!r}. Use optimizer="sgd" '
        'or backbone_learning_rate_multiplier=1.0.')


def _check_boundary_fractions(boundary_fractions):
  if not all(0 < fraction < 1 for fraction in boundary_fractions):
    raise errors.ConfigError(
        'lr_boundary_fractions must all be in (0, 1). Received: '
        f'lr_boundary_fractions={tuple(boundary_fractions)!r}')


def scaled_learning_rate(learning_rate, global_batch_size,
                         learning_rate_batch_size=256):
  """Linear scaling rule (Goyal et al. 2017): the LR grows with the batch.

  Args:
    learning_rate: Peak LR for a global batch of `learning_rate_batch_size`.
    global_batch_size: Images per optimizer step, over all replicas.
    learning_rate_batch_size: The batch size `learning_rate` refers to.

  Returns:
    `learning_rate * global_batch_size / learning_rate_batch_size`.
  """
  return learning_rate * global_batch_size / learning_rate_batch_size


def create_schedule(peak_learning_rate, total_steps, warmup_steps=0):
  """Linear warmup from 0 to the peak, then cosine decay to 0.

  Args:
    peak_learning_rate: LR reached at the end of warmup.
    total_steps: Optimizer steps of the whole run.
    warmup_steps: Steps of linear warmup, fewer than `total_steps`.

  Returns:
    A `keras.optimizers.schedules.LearningRateSchedule`.
  """
  if total_steps <= 0:
    raise errors.ConfigError(
        f'total_steps must be positive. Received: {total_steps}')
  if not 0 <= warmup_steps < total_steps:
    raise errors.ConfigError(
        'warmup_steps must be in [0, total_steps). Received: '
        f'warmup_steps={warmup_steps}, total_steps={total_steps}')
  return keras.optimizers.schedules.CosineDecay(
      initial_learning_rate=0.0 if warmup_steps else peak_learning_rate,
      decay_steps=total_steps - warmup_steps,
      alpha=0.0,
      warmup_target=peak_learning_rate if warmup_steps else None,
      warmup_steps=warmup_steps)


@keras.saving.register_keras_serializable(package='keras_sft')
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup from 0, then the peak times `factor` per boundary passed.

  lr(t) = peak·t/warmup_steps for t < warmup_steps, else
  peak·factor^(number of boundaries <= t). BiT-HyperRule's schedule.
  """

  def __init__(self, peak_learning_rate, boundaries, factor=0.1,
               warmup_steps=0):
    self.peak_learning_rate = float(peak_learning_rate)
    self.boundaries = [int(b) for b in boundaries]
    self.factor = float(factor)
    self.warmup_steps = int(warmup_steps)

  def __call__(self, step):
    step = keras.ops.cast(step, 'float32')
    passed = sum(keras.ops.cast(step >= b, 'float32') for b in self.boundaries)
    decayed = self.peak_learning_rate * keras.ops.power(self.factor, passed)
    if not self.warmup_steps:
      return decayed
    warmup = self.peak_learning_rate * step / self.warmup_steps
    return keras.ops.where(step < self.warmup_steps, warmup, decayed)

  def get_config(self):
    return {'peak_learning_rate': self.peak_learning_rate,
            'boundaries': self.boundaries, 'factor': self.factor,
            'warmup_steps': self.warmup_steps}


def create_step_schedule(peak_learning_rate, total_steps, warmup_steps=0,
                         boundary_fractions=(0.3, 0.6, 0.9), factor=0.1):
  """Warmup, then step decay by `factor` at fractions of `total_steps`."""
  if total_steps <= 0 or not 0 <= warmup_steps < total_steps:
    raise errors.ConfigError(
        'Need total_steps > 0 and warmup_steps in [0, total_steps). '
        f'Received: total_steps={total_steps}, warmup_steps={warmup_steps}')
  _check_boundary_fractions(boundary_fractions)
  return WarmupStepDecay(
      peak_learning_rate,
      [int(round(f * total_steps)) for f in boundary_fractions], factor,
      warmup_steps)


def ema_momentum_at(ema_momentum, iterations):
  """The EMA momentum of the update after `iterations` optimizer steps.

  0 for the first update (the average starts as a copy of the weights), then
  min(m, (1 + t) / (10 + t)) for t = iterations: the warm-up of TF's
  `ExponentialMovingAverage(num_updates=t)` and timm's model EMA. Without
  it, after n steps of an m = 0.999 average the first step's weights (close
  to the initialization) still weigh 0.999^n: 79% after 234 steps.
  """
  step = keras.ops.cast(iterations, 'float32')
  ramp = keras.ops.minimum(float(ema_momentum), (1.0 + step) / (10.0 + step))
  return keras.ops.where(step > 0, ramp, 0.0)


class _WarmUpEMA:
  """Mixin: Keras' `use_ema` average with the warm-up of `ema_momentum_at`."""

  def _update_model_variables_moving_average(self, trainable_variables):
    if not self.use_ema:
      return
    momentum = ema_momentum_at(self.ema_momentum, self.iterations)
    for variable, average in zip(trainable_variables,
                                 self._model_variables_moving_average):
      if average is not None:
        momentum_of_variable = keras.ops.cast(momentum, variable.dtype)
        average.assign(momentum_of_variable * average +
                       (1 - momentum_of_variable) * variable)


class _ScaledLearningRates:
  """Mixin: a learning rate per variable, the schedule's × its scale.

  `learning_rate_scales` maps a variable's path to its scale (1 for a path
  not in it): layer decay. The scaled rate is what the optimizer's update
  takes, so SGD (momentum included) and Adam steps are exactly `scale` times
  those at scale 1, whatever the gradient's scale (unlike a gradient
  multiplier, which Adam normalizes away).
  """

  def __init__(self, *args, learning_rate_scales=None, **kwargs):
    super().__init__(*args, **kwargs)
    self.learning_rate_scales = {
        str(path): float(scale)
        for path, scale in (learning_rate_scales or {}).items()}
    self._scale_of_index = ()

  def build(self, variables):
    super().build(variables)
    paths = [variable.path for variable in variables]
    unknown = sorted(set(self.learning_rate_scales) - set(paths))
    if unknown:
      raise ValueError(
          f'learning_rate_scales names variables the optimizer does not '
          f'train: {unknown[:3]}')
    self._scale_of_index = tuple(
        self.learning_rate_scales.get(path, 1.0) for path in paths)

  def scaled_learning_rate(self, learning_rate, variable):
    """`learning_rate` × the scale of `variable` (of its index)."""
    if not self.learning_rate_scales:
      return learning_rate
    scale = self._scale_of_index[self._get_variable_index(variable)]
    if scale == 1.0:
      return learning_rate
    return learning_rate * scale

  def get_config(self):
    config = super().get_config()
    config['learning_rate_scales'] = dict(self.learning_rate_scales)
    return config


@keras.saving.register_keras_serializable(package='keras_sft')
class AdamW(_WarmUpEMA, _ScaledLearningRates, keras.optimizers.AdamW):
  """`keras.optimizers.AdamW` whose EMA (if on) warms up, with per-variable
  learning-rate scales (the decoupled decay w·wd·lr scaled too, as a
  PyTorch parameter group's learning rate does)."""

  def update_step(self, gradient, variable, learning_rate):
    return super().update_step(
        gradient, variable, self.scaled_learning_rate(learning_rate, variable))

  def _apply_weight_decay(self, variables):
    """Keras' TensorFlow decoupled decay, w ← w − w·wd·lr·scale."""
    if self.weight_decay is None:
      return

    def distributed_apply_weight_decay(distribution, variables):

      def weight_decay_fn(variable):
        if self._use_weight_decay(variable):
          learning_rate = tf.cast(
              self.scaled_learning_rate(self.learning_rate, variable),
              variable.dtype)
          decay = tf.cast(self.weight_decay, variable.dtype)
          variable.assign_sub(variable * decay * learning_rate)

      for variable in variables:
        if isinstance(variable, keras.Variable):
          variable = variable.value
        distribution.extended.update(variable, weight_decay_fn, group=False)

    tf.__internal__.distribute.interim.maybe_merge_call(
        distributed_apply_weight_decay, self._distribution_strategy,
        variables)


def _handle(variable):
  """The TensorFlow resource handle of a Keras or tf variable."""
  if isinstance(variable, keras.Variable):
    variable = variable.value
  # Of this device's copy inside `tf.distribute`'s update() calls.
  return variable.handle


@keras.saving.register_keras_serializable(package='keras_sft')
class FusedSGD(_WarmUpEMA, _ScaledLearningRates, keras.optimizers.SGD):
  """`keras.optimizers.SGD` whose momentum update is one TensorFlow kernel.

  Same variables, config and formula as Keras' SGD: m ← μ·m − lr·g, then
  w ← w + m (Nesterov: w ← w + μ·m − lr·g). Keras computes it with five ops
  per variable (two scalings, a difference, two assignments), each a pass over
  the variable's memory; `ResourceApplyKerasMomentum`, the kernel Keras 2 used,
  reads w, m and g once and writes w and m once (README "Performance").
  Without momentum, or for sparse gradients, Keras' code runs. Its EMA, if
  on, warms up (`ema_momentum_at`); `learning_rate_scales` scales the rate
  per variable (`_ScaledLearningRates`).
  """

  def update_step(self, gradient, variable, learning_rate):
    learning_rate = self.scaled_learning_rate(learning_rate, variable)
    if not self.momentum or isinstance(gradient, tf.IndexedSlices):
      return super().update_step(gradient, variable, learning_rate)
    momentum = self.momentums[self._get_variable_index(variable)]
    tf.raw_ops.ResourceApplyKerasMomentum(
        var=_handle(variable), accum=_handle(momentum),
        lr=tf.cast(learning_rate, variable.dtype),
        grad=tf.cast(gradient, variable.dtype),
        momentum=tf.cast(self.momentum, variable.dtype),
        use_nesterov=self.nesterov)
    return None


def _create_sgd(learning_rate, options, ema, scales):
  return FusedSGD(learning_rate=learning_rate, momentum=options['momentum'],
                  nesterov=options['nesterov'], learning_rate_scales=scales,
                  **ema)


def _create_adamw(learning_rate, options, ema, scales):
  optimizer = AdamW(learning_rate=learning_rate,
                    weight_decay=options['adamw_weight_decay'],
                    learning_rate_scales=scales, **ema)
  # Decay kernels only, like the L2 term: not biases, not BatchNorm.
  optimizer.exclude_from_weight_decay(
      var_names=['bias', 'gamma', 'beta', 'moving_mean', 'moving_variance'])
  return optimizer


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """One optimizer of `config.optimizer`, and what it can do.

  Attributes:
    create: `create(learning_rate, options, ema, scales)` returns the
      Keras optimizer; `options` maps config keys (its own, such as
      `momentum`) to values; `ema` holds Keras' `use_ema` and
      `ema_momentum` arguments (its class must mix in `_WarmUpEMA`);
      `scales` maps variable paths to learning-rate scales (layer decay;
      its class must mix in `_ScaledLearningRates` and scale the rate its
      update and any decoupled decay use).
    gradient_scale_invariant: Whether its update ignores the gradient's
      scale (Adam, Lion): `backbone_learning_rate_multiplier`, which scales
      the backbone's gradients, would then do nothing and is refused.
    zero_gradient_freezes: Whether steps with a zero gradient leave a
      variable and its slots exactly as they would be without those steps,
      which the head-only phase (backbone gradients 0) relies on.
    zero_gradient_freezes_reason: Why not, for the error message.
  """
  create: Callable
  gradient_scale_invariant: bool
  zero_gradient_freezes: bool
  zero_gradient_freezes_reason: str = ''


OPTIMIZERS = {
    'sgd': Optimizer(create=_create_sgd, gradient_scale_invariant=False,
                     zero_gradient_freezes=True),
    # The backbone's moments stay 0 in the head-only phase, but Adam's bias
    # correction counts its steps, so the first steps after unfreezing are
    # several times the learning rate (a fresh Adam: 1x); its own step
    # count per variable would need Adam's update rewritten.
    'adamw': Optimizer(
        create=_create_adamw, gradient_scale_invariant=True,
        zero_gradient_freezes=False,
        zero_gradient_freezes_reason=(
            "Adam's bias correction counts the head-only steps, in which "
            "the backbone's moments stay zero, so the backbone's first "
            'steps after it unfreezes are 3-6x the learning rate.')),
}


def create_optimizer(name, learning_rate, momentum=0.9, nesterov=False,
                     adamw_weight_decay=0.0, ema_momentum=None,
                     learning_rate_scales=None):
  """Returns the optimizer `name` of `OPTIMIZERS`, with its EMA if on.

  With `ema_momentum`, the optimizer keeps an exponential moving average of
  the trainable variables (Keras' own `use_ema`, with a warm-up): after
  step t (1-based), ema_1 = w_1 and ema_t = m_t·ema_{t-1} + (1 - m_t)·w_t
  with m_t = min(m, t / (9 + t)) (`ema_momentum_at`). The averages are
  optimizer variables, so backups carry them.

  Args:
    name: A key of `OPTIMIZERS` ('sgd': `FusedSGD`, 'adamw': `AdamW`).
    learning_rate: A float or a schedule.
    momentum: SGD momentum.
    nesterov: Nesterov momentum for SGD.
    adamw_weight_decay: AdamW's decoupled weight decay, applied to the same
      variables as the L2 term (kernels only).
    ema_momentum: None (no EMA) or m in [0, 1).
    learning_rate_scales: None, or a dict from variable path to the scale
      of its learning rate (`layer_decay_scales`).
  """
  return _create(name, learning_rate, dict(
      momentum=momentum, nesterov=nesterov,
      adamw_weight_decay=adamw_weight_decay, ema_momentum=ema_momentum),
                 learning_rate_scales)


def from_config(config, learning_rate, learning_rate_scales=None):
  """The run's optimizer: `create_optimizer` with the config's keys."""
  return _create(config.optimizer, learning_rate, config,
                 learning_rate_scales)


def layer_decay_scales(variable_stages, stages, layer_decay):
  """timm's layer-wise learning-rate decay over a backbone's stages.

  Args:
    variable_stages: A dict from variable path to its stage (a name of
      `stages`), or None for a variable outside the backbone (the head).
    stages: The backbone's stage names, in order (n of them).
    layer_decay: d in (0, 1].

  Returns:
    A dict from variable path to d^(n − i) for a variable of stage i
    (1-based; the last stage 1), 1.0 outside the backbone.
  """
  check_layer_decay(layer_decay)
  exponent = {stage: len(stages) - 1 - i for i, stage in enumerate(stages)}
  return {path: 1.0 if stage is None else layer_decay**exponent[stage]
          for path, stage in variable_stages.items()}


def _create(name, learning_rate, options, learning_rate_scales=None):
  errors.check_fraction('ema_momentum', options['ema_momentum'],
                        optional=True)
  errors.check_choice('optimizer', name, tuple(OPTIMIZERS))
  ema_momentum = options['ema_momentum']
  ema = dict(use_ema=ema_momentum is not None,
             ema_momentum=0.99 if ema_momentum is None else ema_momentum)
  return OPTIMIZERS[name].create(learning_rate, options, ema,
                                 learning_rate_scales)
