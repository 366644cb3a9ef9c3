"""Tests of keras_sft.recipe: recipe config checks and schedule choice."""

import pytest
import tensorflow as tf

from configs import default as default_lib
from keras_sft import recipe


def test_step_schedule_is_picked_and_follows_the_fractions():
  config = default_lib.get_config()
  config.lr_schedule = 'step'
  config.lr_boundary_fractions = (0.5,)
  config.lr_decay_factor = 0.5
  schedule = recipe.create_schedule(config, 0.2, total_steps=100,
                                    warmup_steps=0)
  assert float(schedule(tf.constant(49))) == pytest.approx(0.2)
  assert float(schedule(tf.constant(50))) == pytest.approx(0.1)
  config.lr_schedule = 'cosine'
  cosine = recipe.create_schedule(config, 0.2, total_steps=100,
                                  warmup_steps=0)
  assert float(cosine(tf.constant(50))) == pytest.approx(0.1, rel=1e-5)
  assert float(cosine(tf.constant(75))) == pytest.approx(
      0.1 * (1 - 2 ** -0.5), rel=1e-5)


def test_adamw_with_a_backbone_multiplier_is_refused():
  config = default_lib.get_config()
  config.optimizer = 'adamw'
  config.backbone_learning_rate_multiplier = 0.1
  with pytest.raises(ValueError, match='backbone_learning_rate_multiplier=0.1'):
    recipe.validate_config(config)
  config.backbone_learning_rate_multiplier = 1.0
  recipe.validate_config(config)
