"""Tests of BiT-HyperRule against the rule as published (arXiv 1912.11370v3)."""

import numpy as np
import pytest
import tensorflow as tf

from configs import default as default_lib
from keras_sft.training import hyperrule
from keras_sft.training import optimizers


# (examples, side) -> (task, resize, crop, steps, boundaries, mixup α), each
# value read off Sec. 3.3 by hand.
@pytest.mark.parametrize('examples, side, expected', [
    (5_000, 32, ('small', 160, 128, 500, (150, 300, 450), 0.0)),
    (50_000, 32, ('medium', 160, 128, 10_000, (3000, 6000, 9000), 0.1)),
    (1_000_000, 224, ('large', 448, 384, 20_000, (6000, 12000, 18000), 0.1)),
    (19_999, 95, ('small', 160, 128, 500, (150, 300, 450), 0.0)),
    (20_000, 96, ('medium', 448, 384, 10_000, (3000, 6000, 9000), 0.1)),
    (499_999, 500, ('medium', 448, 384, 10_000, (3000, 6000, 9000), 0.1)),
])
def test_choices_match_the_published_rule(examples, side, expected):
  choices = hyperrule.bit_hyperrule(examples, side)
  assert (choices.task_size, choices.resize_size, choices.crop_size,
          choices.total_steps, choices.boundaries,
          choices.mixup_alpha) == expected
  assert (choices.batch_size, choices.learning_rate, choices.momentum,
          choices.decay_factor) == (512, 0.003, 0.9, 0.1)
  assert choices.weight_decay == 0 and choices.dropout_rate == 0


def test_area_not_side_decides_resolution():
  assert hyperrule.bit_hyperrule(100, 64, 143).crop_size == 128  # 9152 px
  assert hyperrule.bit_hyperrule(100, 64, 144).crop_size == 384  # 9216 px


def test_apply_to_config_sets_and_logs_the_choices(caplog):
  config = default_lib.get_config()
  with caplog.at_level('INFO'):
    hyperrule.apply_to_config(config, num_train_examples=50_000,
                              image_side=32)
  assert (config.image_size, config.resize_size) == (128, 160)
  assert config.global_batch_size == config.learning_rate_batch_size == 512
  assert config.learning_rate == 0.003 and config.weight_decay == 0
  assert config.mixup_alpha == 0.1 and config.lr_schedule == 'step'
  # 10,000 steps exactly: 125 "epochs" of 80 steps (80 | 10,000, <= 97).
  assert (config.num_epochs, config.steps_per_epoch) == (125, 80)
  assert 'BiT-HyperRule sets mixup_alpha = 0.1' in caplog.text


def test_step_schedule_decays_by_ten_at_30_60_90_percent():
  schedule = optimizers.create_step_schedule(0.003, 10_000, warmup_steps=0)
  steps = [0, 2999, 3000, 5999, 6000, 8999, 9000, 9999]
  values = [float(schedule(tf.constant(s, tf.int64))) for s in steps]
  np.testing.assert_allclose(
      values, [3e-3, 3e-3, 3e-4, 3e-4, 3e-5, 3e-5, 3e-6, 3e-6], rtol=1e-5)
  warm = optimizers.create_step_schedule(0.003, 500, warmup_steps=100)
  np.testing.assert_allclose(float(warm(tf.constant(50))), 0.0015, rtol=1e-6)


def test_bad_sizes_are_named():
  with pytest.raises(ValueError, match='num_train_examples=0'):
    hyperrule.bit_hyperrule(0, 32)
