"""From a config to a run's model: the derived numbers and the one builder.

`make_plan(config, num_train_examples)` computes (and logs) the numbers the
config implies: steps per epoch, total steps, warmup, the linearly scaled
peak learning rate, the head-only steps. `build_model(config, num_classes,
plan)` builds the run's compiled `Classifier` (network, BN policy, frozen
stages, optimizer with its EMA slots, loss, metrics, dtype policy) with all
of its variables created, ready for `fit` or for loading a backup. Training,
`--mode=evaluate`, the export of a finished run and the benchmarks all build
through it, so a run is built the same way wherever it is read back.
"""

import dataclasses
import logging

import keras
import numpy as np

from keras_sft.models import backbones
from keras_sft.models import classifier
from keras_sft.models import fixmatch
from keras_sft.models import losses
from keras_sft.models import network
from keras_sft.training import distribution
from keras_sft.training import optimizers
from keras_sft.training import precision


@dataclasses.dataclass(frozen=True)
class Plan:
  """Numbers derived from the config and the dataset size.

  Attributes:
    steps_per_epoch: Optimizer steps per epoch.
    total_steps: Optimizer steps of the whole run.
    warmup_steps: Steps of linear warmup (fewer than `total_steps`).
    peak_learning_rate: The learning rate after warmup.
    head_only_steps: Steps, from 0, in which only the head trains.
  """
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  peak_learning_rate: float
  head_only_steps: int


def steps_per_epoch(config, num_train_examples):
  """`config.steps_per_epoch`, or the full global batches of the split."""
  return (config.steps_per_epoch or
          num_train_examples // config.global_batch_size)


def make_plan(config, num_train_examples):
  """Derives the run's step counts and learning rate; logs how.

  Args:
    config: The run's ConfigDict.
    num_train_examples: Examples in the train split.

  Returns:
    A `Plan`.
  """
  epoch_steps = steps_per_epoch(config, num_train_examples)
  total_steps = config.num_epochs * epoch_steps
  plan = Plan(
      steps_per_epoch=epoch_steps,
      total_steps=total_steps,
      warmup_steps=min(int(round(config.warmup_epochs * epoch_steps)),
                       total_steps - 1),
      peak_learning_rate=optimizers.scaled_learning_rate(
          config.learning_rate, config.global_batch_size,
          config.learning_rate_batch_size),
      head_only_steps=int(round(config.head_only_epochs * epoch_steps)))
  logging.info(
      'Derived: %d steps/epoch x %d epochs = %d steps; warmup %d steps; peak '
      'learning rate %g (= %g x %d / %d).', plan.steps_per_epoch,
      config.num_epochs, plan.total_steps, plan.warmup_steps,
      plan.peak_learning_rate, config.learning_rate, config.global_batch_size,
      config.learning_rate_batch_size)
  logging.info('Recipe: batch_norm=%s, freeze_until=%s, head-only steps %d, '
               'backbone LR multiplier %g.', config.batch_norm,
               config.freeze_until, plan.head_only_steps,
               config.backbone_learning_rate_multiplier)
  logging.info('Optimizer step: L2 toward %s, gradient clipping at global '
               'norm %s, %d micro-batch(es) of %g images per step.',
               config.weight_decay_target, config.clip_global_norm,
               config.gradient_accumulation_steps,
               config.global_batch_size / config.gradient_accumulation_steps)
  return plan


def create_schedule(config, plan):
  """Returns the LR schedule `config.lr_schedule` names (cosine or step)."""
  if config.lr_schedule == 'step':
    return optimizers.create_step_schedule(
        plan.peak_learning_rate, plan.total_steps, plan.warmup_steps,
        boundary_fractions=tuple(config.lr_boundary_fractions),
        factor=config.lr_decay_factor)
  return optimizers.create_schedule(plan.peak_learning_rate, plan.total_steps,
                                    plan.warmup_steps)


def _layer_decay_scales(config, network_model):
  """`config.layer_decay`'s scale per trainable variable (None: off); logs
  one line per stage."""
  if config.layer_decay is None:
    return None
  stages_of = network.variable_stages(network_model, config.model)
  stages = backbones.stages(config.model)
  scales = optimizers.layer_decay_scales(stages_of, stages,
                                         config.layer_decay)
  for stage in stages + (None,):
    paths = [path for path, s in stages_of.items() if s == stage]
    if paths:
      logging.info('Layer decay %g: %s learning rate x %.6g (%d variables).',
                   config.layer_decay, stage or 'head', scales[paths[0]],
                   len(paths))
  return scales


def compile_model(model, optimizer, jit_compile=False, steps_per_execution=1,
                  label_smoothing=0.0):
  """Compiles with from-logits cross-entropy, top-1 and top-5 accuracy.

  The loss takes class ids or soft (MixUp/CutMix) labels; see
  `keras_sft.models.losses`.
  """
  model.compile(
      optimizer=optimizer,
      loss=losses.CrossEntropy(label_smoothing=label_smoothing),
      metrics=[
          keras.metrics.SparseCategoricalAccuracy(name='accuracy'),
          keras.metrics.SparseTopKCategoricalAccuracy(k=5, name='top5'),
      ],
      jit_compile=jit_compile,
      steps_per_execution=steps_per_execution)


def create_variables(model, image_size):
  """Creates the model's variables (needed before restoring a backup)."""
  model(np.zeros((1, image_size, image_size, 3), np.float32), training=False)


def _model_class(config):
  """The `Classifier`, or its FixMatch subclass (same variables)."""
  if config.semi_supervised == 'fixmatch':
    return fixmatch.FixMatchClassifier
  return classifier.Classifier


def _method_arguments(config):
  if config.semi_supervised == 'fixmatch':
    return dict(threshold=config.fixmatch_threshold,
                unlabeled_weight=config.fixmatch_unlabeled_weight)
  return {}


def build_model(config, num_classes, plan=None, pretrained=True):
  """Builds the run's compiled model with every variable created.

  Call it inside the strategy's scope when there is one. The same function
  builds the model for training, evaluation and export, so the trainable
  set, the BN policy and the optimizer's slots always match the run's
  backups.

  Args:
    config: The run's ConfigDict (the keys of `keras_sft/default_config.py`).
    num_classes: Width of the head.
    plan: The run's `Plan`; None for a model that is only restored and
      evaluated or exported (a constant zero learning rate, no head-only
      phase).
    pretrained: Load `config.weights` into the backbone; False when a
      backup's weights are loaded next anyway.

  Returns:
    A compiled `classifier.Classifier` with variables and optimizer slots.
  """
  policy = precision.resolve_policy(config.precision)
  logging.info('Dtype policy: %s.', policy)
  # The policy applies to the layers built here; the global is restored after.
  with precision.global_policy(policy):
    model = _model_class(config)(
        network.build_network(
            num_classes, network.Spec.from_config(config, pretrained)),
        weight_decay=config.weight_decay,
        backbone_multiplier=config.backbone_learning_rate_multiplier,
        head_only_steps=plan.head_only_steps if plan else 0,
        weight_decay_target=config.weight_decay_target,
        clip_global_norm=config.clip_global_norm,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        name='classifier', **_method_arguments(config))
    if plan is None:
      # A schedule, as in training, so the optimizer has no learning-rate
      # variable and a backup's optimizer state loads into it.
      schedule = optimizers.create_schedule(0.0, total_steps=1)
    else:
      schedule = create_schedule(config, plan)
    optimizer = optimizers.from_config(
        config, schedule, learning_rate_scales=_layer_decay_scales(
            config, model.network))
    compile_model(
        model, optimizer,
        jit_compile=distribution.resolve_jit_compile(config.jit_compile),
        steps_per_execution=config.steps_per_execution,
        label_smoothing=config.label_smoothing)
    create_variables(model, config.image_size)
    # The optimizer's slots must exist before a backup's state can load.
    model.optimizer.build(model.trainable_variables)
  return model
