"""Tests of the BatchNorm policy and stage freezing in keras_sft.models."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import conftest
from keras_sft import batch_norm
from keras_sft import classifier
from keras_sft import models
from keras_sft import precision


def _network():
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(4, 3, use_bias=False, name='conv')(inputs)
  x = keras.layers.BatchNormalization(name='bn')(x)
  x = keras.layers.ReLU()(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  outputs = keras.layers.Dense(5, name='head')(x)
  return keras.Model(inputs, outputs)


def _model(policy, initial_weights=None):
  keras.utils.set_random_seed(1)
  network = _network()
  assert models.set_batch_norm_policy(network, policy) == 1
  model = classifier.Classifier(network, weight_decay=0.01)
  model.compile(
      optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model(np.zeros((1, 8, 8, 3), np.float32))
  if initial_weights is not None:
    model.set_weights(initial_weights)
  return model


def _data(size=16):
  rng = np.random.default_rng(0)
  # Far from BN's initial moving statistics (0, 1), so updates show.
  images = rng.normal(3.0, 2.0, (size, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 5, size).astype(np.int64)
  return images, labels


def _bn_state(model):
  bn = model.network.get_layer('bn')
  return [np.asarray(v) for v in (bn.moving_mean, bn.moving_variance,
                                  bn.gamma, bn.beta)]


@pytest.mark.parametrize('policy', ['frozen', 'trained'])
def test_frozen_batch_norm_keeps_its_statistics(policy):
  model = _model(policy)
  before = _bn_state(model)
  kernel = np.asarray(model.network.get_layer('conv').kernel)
  images, labels = _data()
  model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
  after = _bn_state(model)
  unchanged = [np.array_equal(a, b) for a, b in zip(before, after)]
  if policy == 'frozen':
    assert all(unchanged)
  else:  # the control: trained BN moves all four
    assert not any(unchanged)
  # The rest of the network trains in both cases.
  assert not np.allclose(kernel, model.network.get_layer('conv').kernel)


def test_synchronized_batch_norm_matches_one_device():
  """2 replicas with BN in training mode = 1 device only when synchronized.

  Runs in its own process: after synchronized BN's collectives, a later
  MirroredStrategy in the same process (other test files) fails with
  collective shape mismatches.
  """
  result = subprocess.run(
      [sys.executable, os.path.join(os.path.dirname(__file__),
                                    'sync_batch_norm_worker.py')],
      capture_output=True, text=True, timeout=300, env=conftest.cli_env())
  assert result.returncode == 0, result.stderr[-3000:]
  differences = json.loads(result.stdout.strip().splitlines()[-1])
  assert differences['synchronized'] < 1e-5
  # The control, per-replica batch statistics: the test can fail.
  assert differences['trained'] > 1e-4


def test_resnet50_freeze_until_and_batch_norm_policy():
  network = models.create_network(10, 32, weights=None, batch_norm='frozen',
                                  freeze_until_stage='conv3')
  backbone = network.get_layer('resnet50')
  for layer in backbone.layers:
    if not layer.weights:
      continue
    stage = layer.name.split('_')[0]
    if isinstance(layer, keras.layers.BatchNormalization):
      assert not layer.trainable, layer.name
    elif stage in ('conv1', 'conv2', 'conv3'):
      assert not layer.trainable, layer.name
    else:
      assert layer.trainable and stage in ('conv4', 'conv5'), layer.name
  assert backbone.get_layer('conv4_block1_1_conv').trainable
  assert not backbone.get_layer('conv3_block4_3_conv').trainable
  assert network.get_layer('head').trainable
  decayed = {v.path for v in classifier.decayed_variables(network)}
  assert backbone.get_layer('conv3_block4_3_conv').kernel.path not in decayed
  assert backbone.get_layer('conv4_block1_1_conv').kernel.path in decayed

  synchronized = models.create_network(10, 32, weights=None,
                                       batch_norm='synchronized')
  bns = [layer for layer in synchronized.get_layer('resnet50').layers
         if isinstance(layer, keras.layers.BatchNormalization)]
  assert len(bns) == 53 and all(layer.synchronized for layer in bns)
  # Every BatchNormalization is the fused one (it runs Keras' code when
  # synchronized).
  assert all(type(layer) is batch_norm.BatchNormalization  # pylint: disable=unidiomatic-typecheck
             for layer in bns)


def test_bad_policy_and_stage_are_named():
  with pytest.raises(ValueError, match="batch_norm='sync'"):
    models.set_batch_norm_policy(_network(), 'sync')
  with pytest.raises(ValueError, match="freeze_until='conv9'"):
    models.freeze_until(_network(), 'conv9')
  with pytest.raises(ValueError, match='matched no layer'):
    models.freeze_until(_network(), 'conv2')


def test_preprocessing_is_exact_float32_under_mixed_bfloat16():
  """The mean is subtracted in float32; bf16 (spacing 0.5 to 1 there) only
  rounds the result, when the backbone's first layer casts it."""
  with precision.global_policy('mixed_bfloat16'):
    network = models.create_network(10, 32, weights=None)
  layer = network.get_layer('preprocessing')
  conv1 = network.get_layer('resnet50').get_layer('conv1_conv')
  assert conv1.compute_dtype == 'bfloat16'  # the run is still mixed
  rng = np.random.default_rng(0)
  every_byte = np.arange(256 * 3, dtype=np.uint8).reshape(1, 16, 16, 3)
  resized = rng.uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
  for images in (every_byte, resized):
    expected = keras.applications.resnet50.preprocess_input(
        images.astype(np.float32))
    actual = keras.ops.convert_to_numpy(layer(images))
    assert actual.dtype == np.float32
    np.testing.assert_array_equal(actual, expected)
