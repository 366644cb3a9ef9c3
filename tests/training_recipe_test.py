"""Tests of keras_sft.training.recipe: derived numbers, schedule choice, the builder."""

import logging

import pytest
import tensorflow as tf

from configs import default as default_lib
from keras_sft.training import recipe


def _plan(peak, total_steps):
  return recipe.Plan(steps_per_epoch=total_steps, total_steps=total_steps,
                     warmup_steps=0, peak_learning_rate=peak,
                     head_only_steps=0)


def test_plan_derives_steps_warmup_and_scaled_learning_rate():
  config = default_lib.get_config()
  config.global_batch_size = 128
  config.learning_rate = 0.1
  config.learning_rate_batch_size = 256
  config.num_epochs = 3
  config.warmup_epochs = 0.5
  config.head_only_epochs = 1.0
  plan = recipe.make_plan(config, num_train_examples=1000)
  # 1000 // 128 = 7 full batches per epoch; the remainder is dropped.
  assert plan == recipe.Plan(steps_per_epoch=7, total_steps=21,
                             warmup_steps=4, peak_learning_rate=0.05,
                             head_only_steps=7)
  config.steps_per_epoch = 2
  assert recipe.make_plan(config, 1000).total_steps == 6


def test_step_schedule_is_picked_and_follows_the_fractions():
  config = default_lib.get_config()
  config.lr_schedule = 'step'
  config.lr_boundary_fractions = (0.5,)
  config.lr_decay_factor = 0.5
  schedule = recipe.create_schedule(config, _plan(0.2, 100))
  assert float(schedule(tf.constant(49))) == pytest.approx(0.2)
  assert float(schedule(tf.constant(50))) == pytest.approx(0.1)
  config.lr_schedule = 'cosine'
  cosine = recipe.create_schedule(config, _plan(0.2, 100))
  assert float(cosine(tf.constant(50))) == pytest.approx(0.1, rel=1e-5)
  assert float(cosine(tf.constant(75))) == pytest.approx(
      0.1 * (1 - 2 ** -0.5), rel=1e-5)


def test_build_model_applies_the_recipe_keys(caplog):
  """The one builder: frozen stages, BN policy, EMA slots, dtype policy,
  layer decay (logged per stage)."""
  caplog.set_level(logging.INFO)
  config = default_lib.get_config()
  config.layer_decay = 0.5
  config.weights = None
  config.image_size = 32
  config.freeze_until = 'conv2'
  config.batch_norm = 'frozen'
  config.ema_momentum = 0.9
  config.precision = 'mixed_bfloat16'
  model = recipe.build_model(config, num_classes=3)
  assert model.optimizer.built and model.optimizer.use_ema
  backbone = model.network.get_layer('resnet50')
  assert not backbone.get_layer('conv2_block1_1_conv').trainable
  assert backbone.get_layer('conv3_block1_1_conv').trainable
  assert not backbone.get_layer('conv5_block1_1_bn').trainable
  assert backbone.get_layer('conv3_block1_1_conv').compute_dtype == 'bfloat16'
  assert model.network.get_layer('head').compute_dtype == 'float32'
  # conv1 and conv2 are frozen: not trained, no learning rate.
  scales = model.optimizer.learning_rate_scales
  assert backbone.get_layer('conv1_conv').kernel.path not in scales
  assert scales[backbone.get_layer('conv3_block1_1_conv').kernel.path] == 0.25
  assert scales[backbone.get_layer('conv4_block1_1_conv').bias.path] == 0.5
  assert scales[backbone.get_layer('conv5_block3_3_conv').kernel.path] == 1.0
  assert scales[model.network.get_layer('head').kernel.path] == 1.0
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith('Layer decay')]
  assert len(lines) == 4  # conv3, conv4, conv5 and the head
  assert 'conv3 learning rate x 0.25' in lines[0]
  # The global policy is left as it was.
  import keras  # pylint: disable=g-import-not-at-top
  assert keras.config.dtype_policy().name == 'float32'

