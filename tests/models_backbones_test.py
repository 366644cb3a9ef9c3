"""Tests of keras_sft.models.backbones: backbone families, BN policy, stage freezing."""

import json
import os
import pickle
import subprocess
import sys

import h5py
import keras
from keras.src.legacy.saving import legacy_h5_format
import numpy as np
import pytest
import tensorflow as tf

import conftest
from configs import default as default_lib
from keras_sft.data import augment
from keras_sft import errors
from keras_sft.export import saved_model
from keras_sft.models import backbones
from keras_sft.models import batch_norm
from keras_sft.models import classifier
from keras_sft.models import depthwise
from keras_sft.models import network as network_lib
from keras_sft.models import precise_bn
from keras_sft.training import precision
from keras_sft.training import recipe


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
  assert network_lib.set_batch_norm_policy(network, policy) == 1
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
  network = network_lib.create_network(10, 32, weights=None, batch_norm='frozen',
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

  synchronized = network_lib.create_network(10, 32, weights=None,
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
    network_lib.set_batch_norm_policy(_network(), 'sync')
  with pytest.raises(ValueError, match="freeze_until='conv9'"):
    network_lib.freeze_until(_network(), 'conv9')
  with pytest.raises(ValueError, match='matched no layer'):
    network_lib.freeze_until(_network(), 'conv2')


def test_preprocessing_is_exact_float32_under_mixed_bfloat16():
  """The mean is subtracted in float32; bf16 (spacing 0.5 to 1 there) only
  rounds the result, when the backbone's first layer casts it."""
  with precision.global_policy('mixed_bfloat16'):
    network = network_lib.create_network(10, 32, weights=None)
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


# --- Backbone families -------------------------------------------------------
# By default the cheapest member of each family; KERAS_SFT_ALL_BACKBONES=1
# runs every `backbones.BACKBONES` entry (README "Backbones").
_MATRIX = [name for name, spec in backbones.BACKBONES.items()
           if spec.cheapest or os.environ.get('KERAS_SFT_ALL_BACKBONES') == '1']
_SIZE = 32
_CLASSES = 3

# Loads every family's SavedModel where `import keras_sft` fails.
_SERVE_WITHOUT_KERAS_SFT = r'''
import pickle
import sys
sys.modules['keras_sft'] = None  # Any import of keras_sft now fails.
import tensorflow as tf
exports, inputs_path, outputs_path = sys.argv[1], sys.argv[2], sys.argv[3]
with open(inputs_path, 'rb') as file:
  images = pickle.load(file)
results = {}
for name in exports.split(','):
  signature = tf.saved_model.load(f'{name}').signatures['serving_default']
  results[name] = signature(images=tf.constant(images))['logits'].numpy()
with open(outputs_path, 'wb') as file:
  pickle.dump(results, file)
'''


def _family_config(name):
  config = default_lib.get_config()
  config.model = name
  config.weights = None
  config.image_size = _SIZE
  config.global_batch_size = 2
  config.weight_decay = 1e-3
  config.ema_momentum = 0.9
  return config


@pytest.fixture(scope='module')
def families(tmp_path_factory):
  """Per model of `_MATRIX`: the run's model after one training step (EMA
  and precise BN on), its export's logits in a process without keras_sft,
  and the in-memory logits on the same uint8 images."""
  directory = tmp_path_factory.mktemp('families')
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, _SIZE, _SIZE, 3)).astype(np.uint8)
  labels = tf.constant([0, 2], tf.int64)
  serve_images = rng.integers(0, 256, (2, 40, 36, 3)).astype(np.uint8)
  results = {}
  for name in _MATRIX:
    keras.utils.set_random_seed(0)
    config = _family_config(name)
    plan = recipe.Plan(steps_per_epoch=1, total_steps=10, warmup_steps=0,
                       peak_learning_rate=0.01, head_only_steps=0)
    model = recipe.build_model(config, _CLASSES, plan)
    # Eager: the same train_step without tracing it per family (the traced
    # step runs in the train and CLI tests).
    model.run_eagerly = True
    before = [np.array(v) for v in model.network.trainable_variables]
    losses = model.train_on_batch(images.astype(np.float32), labels,
                                  return_dict=True)
    after = [np.array(v) for v in model.network.trainable_variables]
    data = tf.data.Dataset.from_tensors((images.astype(np.float32), labels))
    reestimated = precise_bn.reestimate(model, data)
    saved_model.export_saved_model(model, str(directory / name), _SIZE,
                                   [str(i) for i in range(_CLASSES)])
    logits = model(augment.preprocess_for_eval(serve_images, _SIZE),
                   training=False)
    results[name] = {
        'model': model, 'losses': losses, 'before': before, 'after': after,
        'reestimated': reestimated,
        'logits': keras.ops.convert_to_numpy(logits)}
  with open(directory / 'images.pkl', 'wb') as file:
    pickle.dump(serve_images, file)
  subprocess.run(
      [sys.executable, '-c', _SERVE_WITHOUT_KERAS_SFT, ','.join(_MATRIX),
       str(directory / 'images.pkl'), str(directory / 'served.pkl')],
      check=True, cwd=str(directory), env=conftest.cli_env(), timeout=600)
  with open(directory / 'served.pkl', 'rb') as file:
    served = pickle.load(file)
  for name in _MATRIX:
    results[name]['served'] = served[name]
  return results


@pytest.mark.parametrize('name', _MATRIX)
def test_family_trains_and_its_export_agrees_without_keras_sft(
    families, name):
  result = families[name]
  assert np.isfinite(result['losses']['loss']) and result['losses']['l2'] > 0
  # The head and the backbone's first layer moved (ConvNeXt's LayerNorm γ
  # behind a LayerScale of 1e-6 moves below float32 resolution in a step).
  variables = result['model'].network.trainable_variables
  moved = {v.path for v, b, a in zip(variables, result['before'],
                                     result['after'])
           if not np.array_equal(b, a)}
  network = result['model'].network
  first = next(layer for layer in network.layers[2]._flatten_layers()  # pylint: disable=protected-access
               if layer.weights and not isinstance(layer, keras.Model))
  assert network.get_layer('head').kernel.path in moved
  assert first.weights[0].path in moved
  batch_norms = [layer for layer in result['model'].network._flatten_layers()  # pylint: disable=protected-access
                 if isinstance(layer, keras.layers.BatchNormalization)]
  assert result['reestimated'] == len(batch_norms)
  assert bool(batch_norms) == backbones.family_of(name).has_batch_norm
  # Every BatchNormalization is the fused one.
  assert all(type(layer) is batch_norm.BatchNormalization  # pylint: disable=unidiomatic-typecheck
             for layer in batch_norms)
  # Every depthwise Conv2D (ConvNeXt's) runs on the depthwise kernel.
  assert all(type(layer) is depthwise.Conv2D  # pylint: disable=unidiomatic-typecheck
             for layer in _leaf_layers(network)
             if depthwise.is_depthwise(layer))
  # Random weights give logits up to ~1e7 (ResNet50V2): relative agreement.
  np.testing.assert_allclose(result['served'], result['logits'], rtol=1e-4,
                             atol=1e-4)


def _leaf_layers(network):
  return [layer for layer in network._flatten_layers(include_self=False)  # pylint: disable=protected-access
          if not isinstance(layer, keras.Model)]


@pytest.mark.parametrize('name', _MATRIX)
def test_l2_mask_is_the_kernels_of_the_family_table_types(families, name):
  network = families[name]['model'].network
  table = backbones.family_of(name).decayed_layer_types + ('Dense',)  # the head
  decayed = {v.path for v in classifier.decayed_variables(network)}
  expected = {layer.kernel.path for layer in _leaf_layers(network)
              if type(layer).__name__ in table and layer.kernel.trainable}
  assert decayed == expected
  types = {type(layer).__name__ for layer in _leaf_layers(network)
           if any(v.path in decayed for v in layer.weights)}
  assert types == set(table)  # every type of the table occurs
  not_decayed = {type(layer).__name__ for layer in _leaf_layers(network)
                 if layer.weights and type(layer).__name__ not in table}
  if name.startswith('convnext'):
    assert not_decayed == {'LayerNormalization', 'LayerScale'}
  elif name.startswith(('efficientnet', 'mobilenet')):
    assert 'DepthwiseConv2D' in types
    assert not_decayed == {'BatchNormalization'}


def _keras_preprocessed(name, images):
  """What Keras feeds the backbone's first weighted layer: its family's
  `preprocess_input`, then the model's own preprocessing layers (if any)."""
  spec = backbones.backbone_spec(name)
  family = backbones.family_of(name)
  module = getattr(keras.applications, family.module)
  images = module.preprocess_input(images.astype(np.float32))
  if not family.include_preprocessing:
    return np.asarray(images)
  reference = getattr(keras.applications, spec.constructor)(
      include_top=False, weights=None, input_shape=(_SIZE, _SIZE, 3),
      include_preprocessing=True)
  first = next(layer for layer in reference.layers if layer.weights)
  upto_first = keras.Model(reference.input, first.input)
  return keras.ops.convert_to_numpy(upto_first(images))


@pytest.mark.parametrize('name', _MATRIX)
def test_preprocessing_equals_keras_for_the_family(families, name):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (2, _SIZE, _SIZE, 3)).astype(np.uint8)
  images[0, :16, :16] = np.arange(256 * 3).reshape(16, 16, 3) % 256
  expected = _keras_preprocessed(name, images)
  layer = families[name]['model'].network.get_layer('preprocessing')
  np.testing.assert_array_equal(
      keras.ops.convert_to_numpy(layer(images)), expected)
  # Also float32 and exact under a mixed policy.
  with precision.global_policy('mixed_bfloat16'):
    mixed = backbones.Preprocessing(backbones.backbone_spec(name).preprocessing)
  actual = keras.ops.convert_to_numpy(mixed(images))
  assert actual.dtype == np.float32
  np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize('name', _MATRIX)
def test_freeze_until_freezes_exactly_the_named_stages(name):
  stages = backbones.stages(name)
  stage = stages[len(stages) // 2]
  backbone = backbones.build_backbone(name, _SIZE)
  frozen = set(network_lib.freeze_until(backbone, stage, name))
  seen = set()
  for layer in backbone.layers:
    layer_stage = network_lib.stage_of(layer.name, backbone.name, name)
    if not layer.weights:
      continue
    assert layer_stage in stages, layer.name  # every weighted layer
    seen.add(layer_stage)
    in_frozen_stage = stages.index(layer_stage) <= stages.index(stage)
    assert (layer.name in frozen) == in_frozen_stage, layer.name
    assert layer.trainable == (not in_frozen_stage), layer.name
  assert seen == set(stages)  # every stage name matches layers


@pytest.mark.parametrize('name', _MATRIX)
def test_family_under_mixed_bfloat16_and_every_batch_norm_policy(name):
  """bf16 backbone, float32 preprocessing and logits; BN frozen, then
  synchronized (families with BN; ConvNeXt refuses both, tested below)."""
  has_batch_norm = backbones.family_of(name).has_batch_norm
  with precision.global_policy('mixed_bfloat16'):
    network = network_lib.create_network(
        _CLASSES, _SIZE, weights=None, model=name,
        batch_norm='frozen' if has_batch_norm else 'trained')
  layers = _leaf_layers(network)
  assert network.get_layer('preprocessing').compute_dtype == 'float32'
  convolutions = [layer for layer in layers
                  if isinstance(layer, keras.layers.Conv2D)]
  assert {layer.compute_dtype for layer in convolutions} == {'bfloat16'}
  images = np.random.default_rng(2).integers(
      0, 256, (2, _SIZE, _SIZE, 3)).astype(np.uint8)
  logits = keras.ops.convert_to_numpy(network(images, training=True))
  assert logits.dtype == np.float32 and np.isfinite(logits).all()
  batch_norms = [layer for layer in layers
                 if isinstance(layer, keras.layers.BatchNormalization)]
  assert not any(layer.trainable for layer in batch_norms)
  assert network_lib.set_batch_norm_policy(network, 'synchronized') == len(
      batch_norms)
  assert all(layer.synchronized for layer in batch_norms)


def _config(**overrides):
  config = default_lib.get_config()
  config.weights = None
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def test_unknown_model_and_stage_list_the_expected_names():
  with pytest.raises(errors.ConfigError, match="model='resnet18'") as error:
    backbones.check_config(_config(model='resnet18'))
  assert 'convnext_tiny' in str(error.value)
  with pytest.raises(errors.ConfigError,
                     match="freeze_until='conv3'") as error:
    backbones.check_config(_config(model='convnext_tiny', freeze_until='conv3'))
  assert "'stage_0'" in str(error.value)
  backbones.check_config(_config(model='convnext_tiny', freeze_until='stage_1'))


def test_an_image_size_below_the_backbones_minimum_is_a_config_error():
  # keras.applications refuses inputs under 32x32 with a bare ValueError,
  # which came after the workdir was claimed (the corrected command was then
  # refused there).
  for name in ('resnet50', 'efficientnetv2_b0', 'mobilenetv3_large'):
    with pytest.raises(errors.ConfigError,
                       match=f"image_size=16 .*model='{name}'.* at least 32"):
      backbones.check_config(_config(model=name, image_size=16))
  with pytest.raises(errors.ConfigError, match='image_size=31'):
    network_lib.create_network(_CLASSES, 31, weights=None, model='convnext_tiny')
  backbones.check_config(_config(model='convnext_tiny', image_size=32))


def test_convnext_refuses_batch_norm_settings_by_name():
  for overrides in ({'batch_norm': 'frozen'},
                    {'batch_norm': 'synchronized'},
                    {'batch_norm_momentum': 0.9}):
    with pytest.raises(errors.ConfigError,
                       match="model='convnext_tiny' has no BatchNorm"):
      backbones.check_config(_config(model='convnext_tiny', **overrides))
  backbones.check_config(_config(model='resnet50v2', batch_norm='frozen'))


def _save_legacy_h5(backbone, path):
  """A weights file in the format of Keras' downloaded ImageNet files."""
  with h5py.File(path, 'w') as file:
    legacy_h5_format.save_weights_to_hdf5_group(file, backbone)


def test_a_weights_file_of_another_family_fails_before_training(tmp_path):
  # Keras' ImageNet files come from models with their preprocessing inside.
  source = keras.applications.MobileNetV3Large(
      include_top=False, weights=None, input_shape=(_SIZE, _SIZE, 3),
      include_preprocessing=True)
  spec = backbones.backbone_spec('mobilenetv3_large')
  path = str(tmp_path / spec.weights_file)
  _save_legacy_h5(source, path)
  # The same family loads, weight for weight.
  network = network_lib.create_network(_CLASSES, _SIZE, weights=path,
                                       model='mobilenetv3_large')
  loaded = network.get_layer(source.name)
  for expected, actual in zip(source.weights, loaded.weights):
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(expected),
                                  keras.ops.convert_to_numpy(actual))
  # Another family's model refuses it, listing what it expected.
  with pytest.raises(errors.ConfigError, match='does not fit') as error:
    network_lib.create_network(_CLASSES, _SIZE, weights=path,
                               model='efficientnetv2_b0')
  message = str(error.value)
  assert 'efficientnetv2-b0_notop.h5' in message
  assert 'stem_conv' in message and 'expanded_conv' in message
  # A Keras 3 `.weights.h5` of another model too.
  other = str(tmp_path / 'other.weights.h5')
  source.save_weights(other)
  with pytest.raises(errors.ConfigError, match='does not fit'):
    network_lib.create_network(_CLASSES, _SIZE, weights=other,
                               model='resnet50v2')
