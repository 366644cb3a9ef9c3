"""The fine-tuning recipe's config keys (README "Recipe"): checks, schedule.

`train.validate_config` calls `validate_config` here for the recipe keys of
`configs/default.py`; `create_schedule` picks the learning-rate schedule.
"""

from keras_sft import models
from keras_sft import optimizers
from keras_sft import precision


def validate_config(config):
  """Raises ValueError naming the first bad recipe value; builds nothing."""
  if config.ema_momentum is not None and not 0 <= config.ema_momentum < 1:
    raise ValueError('config.ema_momentum must be None or in [0, 1). '
                     f'Received: ema_momentum={config.ema_momentum!r}')
  if config.batch_norm not in models.BATCH_NORM_POLICIES:
    raise ValueError(f'Unknown batch_norm: batch_norm={config.batch_norm!r}. '
                     f'Expected one of {models.BATCH_NORM_POLICIES}.')
  if config.freeze_until is not None and (
      config.freeze_until not in models.STAGES):
    raise ValueError(f'Unknown stage: freeze_until={config.freeze_until!r}. '
                     f'Expected None or one of {models.STAGES}.')
  if not 0 <= config.head_only_epochs < config.num_epochs:
    raise ValueError('config.head_only_epochs must be in [0, num_epochs). '
                     f'Received: head_only_epochs={config.head_only_epochs!r}'
                     f', num_epochs={config.num_epochs!r}')
  if config.backbone_learning_rate_multiplier < 0:
    raise ValueError(
        'config.backbone_learning_rate_multiplier must be >= 0. Received: '
        'backbone_learning_rate_multiplier='
        f'{config.backbone_learning_rate_multiplier!r}')
  if config.optimizer == 'adamw' and (
      config.backbone_learning_rate_multiplier != 1.0 or
      (config.head_only_epochs and config.adamw_weight_decay)):
    # keras_sft.classifier: a gradient multiplier is an LR multiplier for SGD
    # only, and AdamW's decoupled decay would move a "frozen" backbone.
    raise ValueError(
        'optimizer="adamw" supports neither backbone_learning_rate_multiplier'
        ' != 1 nor head_only_epochs with adamw_weight_decay > 0. Received: '
        'backbone_learning_rate_multiplier='
        f'{config.backbone_learning_rate_multiplier!r}, head_only_epochs='
        f'{config.head_only_epochs!r}, adamw_weight_decay='
        f'{config.adamw_weight_decay!r}. Use optimizer="sgd".')
  if config.lr_schedule not in ('cosine', 'step'):
    raise ValueError(f'Unknown lr_schedule: lr_schedule='
                     f'{config.lr_schedule!r}. Expected "cosine" or "step".')
  if config.resize_size is not None and not (
      config.resize_size >= config.image_size):
    raise ValueError('config.resize_size must be None or >= image_size. '
                     f'Received: resize_size={config.resize_size!r}, '
                     f'image_size={config.image_size!r}')
  if config.precision not in precision.POLICIES:
    raise ValueError(f'Unknown precision: precision={config.precision!r}. '
                     f'Expected one of {precision.POLICIES}.')
  if not 0 <= config.label_smoothing < 1:
    raise ValueError('config.label_smoothing must be in [0, 1). Received: '
                     f'label_smoothing={config.label_smoothing!r}')
  if config.mixup_alpha < 0 or not 0 <= config.cutmix_alpha <= 1:
    raise ValueError('config.mixup_alpha must be >= 0 and config.cutmix_alpha '
                     f'in [0, 1]. Received: mixup_alpha={config.mixup_alpha!r}'
                     f', cutmix_alpha={config.cutmix_alpha!r}')
  if (config.randaugment_num_ops < 0 or
      not 0 <= config.randaugment_magnitude <= 1):
    raise ValueError(
        'config.randaugment_num_ops must be >= 0 and '
        'config.randaugment_magnitude in [0, 1]. Received: '
        f'randaugment_num_ops={config.randaugment_num_ops!r}, '
        f'randaugment_magnitude={config.randaugment_magnitude!r}')


def create_schedule(config, peak_learning_rate, total_steps, warmup_steps):
  """Returns the LR schedule `config.lr_schedule` names (cosine or step)."""
  if config.lr_schedule == 'step':
    return optimizers.create_step_schedule(
        peak_learning_rate, total_steps, warmup_steps,
        boundary_fractions=tuple(config.lr_boundary_fractions),
        factor=config.lr_decay_factor)
  return optimizers.create_schedule(peak_learning_rate, total_steps,
                                    warmup_steps)
