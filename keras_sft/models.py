"""The fine-tuning network: ResNet50 backbone and a new classification head.

The network takes RGB images with values in [0, 255] (uint8 or float) and
applies ResNet50's own preprocessing inside the graph, so training, evaluation
and the serving export all feed the backbone what its weights expect. Its
BatchNormalization layers run TensorFlow's fused kernel
(`keras_sft.batch_norm`), with Keras' weights and arithmetic, except under
`batch_norm='synchronized'`, where Keras' own cross-replica computation runs.
"""

import logging
import os

import keras

from keras_sft import batch_norm as batch_norm_module
from keras_sft import classifier
from keras_sft import errors

# The file Keras downloads for `ResNet50(include_top=False, weights=
# 'imagenet')` and looks for first in $KERAS_HOME/models/.
IMAGENET_NOTOP_WEIGHTS = 'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5'


# config.batch_norm: how the backbone's BatchNormalization layers train.
BATCH_NORM_POLICIES = ('trained', 'frozen', 'synchronized')
# ResNet50's stages, by the prefix of their layer names ('pool1_*' is conv1's).
STAGES = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5')


# The first bytes of every HDF5 file (Keras' .h5 and .weights.h5 formats).
_HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'


class WeightsUnavailableError(errors.UnavailableError):
  """ImageNet weights are neither cached locally nor downloadable."""


def check_config(config):
  """Checks the model keys of the config; reads the weights file's header."""
  resolve_weights(config.weights)
  errors.check_fraction('dropout_rate', config.dropout_rate)
  errors.check_choice('batch_norm', config.batch_norm, BATCH_NORM_POLICIES)
  errors.check_fraction('batch_norm_momentum', config.batch_norm_momentum,
                        optional=True)
  errors.check_choice('freeze_until', config.freeze_until, STAGES,
                      optional=True)


@keras.saving.register_keras_serializable(package='keras_sft')
class ResNetPreprocessing(keras.layers.Layer):
  """ResNet50's 'caffe' preprocessing: RGB to BGR, minus the ImageNet mean.

  Same arithmetic as `keras.applications.resnet50.preprocess_input`, as a
  named, serializable layer. It computes in float32 unless given another
  `dtype`, also under a mixed policy: bfloat16 has a spacing of 0.5 to 1
  between 64 and 255, so subtracting the mean there rounded the input and
  the mean (104 - 103.939 gave 0, not 0.061). The next layer casts the
  exact result to its compute dtype.
  """

  def __init__(self, **kwargs):
    kwargs.setdefault('dtype', 'float32')
    super().__init__(**kwargs)

  def call(self, inputs):
    images = keras.ops.cast(inputs, self.compute_dtype)
    return keras.applications.resnet50.preprocess_input(images)


def _imagenet_weights_help():
  keras_home = os.environ.get('KERAS_HOME',
                              os.path.join(os.path.expanduser('~'), '.keras'))
  return (
      'Could not download the ImageNet weights of ResNet50. Routes that need '
      'no network: (1) pass a local file with --config.weights=/path/to/'
      f'{IMAGENET_NOTOP_WEIGHTS}; (2) put that file in '
      f'{os.path.join(keras_home, "models")}/ where Keras looks before '
      'downloading; (3) --config.weights=None to start from random weights.')


def resolve_weights(weights):
  """Checks a `weights` setting and returns what `ResNet50` should get.

  Args:
    weights: 'imagenet', None (or 'none'/'') or a path to a local file.

  Raises:
    PathNotFoundError: a path that does not exist.
    ConfigError: a file that is not HDF5 (Keras' weights format).
  """
  if weights is None or str(weights).lower() in ('none', ''):
    return None
  if weights == 'imagenet':
    return 'imagenet'
  if not os.path.isfile(weights):
    raise errors.PathNotFoundError(
        f'weights={weights!r} is neither "imagenet", None, nor an existing '
        f'file. Expected a local ResNet50 no-top weights file such as '
        f'{IMAGENET_NOTOP_WEIGHTS}.')
  with open(weights, 'rb') as file:
    if file.read(len(_HDF5_SIGNATURE)) != _HDF5_SIGNATURE:
      raise errors.ConfigError(
          f'weights={weights!r} is not an HDF5 weights file (.h5 or '
          f'.weights.h5, as Keras saves them). Expected a ResNet50 no-top '
          f'weights file such as {IMAGENET_NOTOP_WEIGHTS}.')
  return weights


def set_batch_norm_policy(model, policy, momentum=None):
  """Sets how every BatchNormalization layer inside `model` trains.

  Args:
    model: A Keras layer or model; its nested layers are visited.
    policy: 'trained' (batch statistics in training, moving statistics and
      γ/β updated: Keras' default), 'frozen' (layers non-trainable: Keras 3
      then runs them in inference mode, so neither γ/β nor the moving
      statistics change; the Keras transfer-learning guide's choice) or
      'synchronized' (batch statistics all-reduced across the replicas of a
      `tf.distribute` strategy, `synchronized=True`; read at call time, so
      setting it on built layers takes effect).
    momentum: None (the layers' own: 0.99 in ResNet50) or the momentum m of
      the moving statistics, moving = m·moving + (1 − m)·batch (PyTorch's
      `momentum=0.1` is m = 0.9).

  Returns:
    The number of BatchNormalization layers changed.
  """
  errors.check_choice('batch_norm', policy, BATCH_NORM_POLICIES)
  errors.check_fraction('batch_norm_momentum', momentum, optional=True)
  count = 0
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if isinstance(layer, keras.layers.BatchNormalization):
      count += 1
      if momentum is not None:
        layer.momentum = float(momentum)
      if policy == 'frozen':
        layer.trainable = False
      elif policy == 'synchronized':
        layer.synchronized = True
  return count


def _stage_of(layer_name):
  prefix = layer_name.split('_', 1)[0]
  if prefix == 'pool1':
    return 'conv1'
  return prefix if prefix in STAGES else None


def freeze_until(backbone, stage):
  """Makes the layers of ResNet50's stages up to `stage` non-trainable.

  Args:
    backbone: Keras' ResNet50 model (layers named conv1_*, pool1_*,
      conv2_block1_*, ..., conv5_block3_*).
    stage: None (nothing frozen) or one of `STAGES`, inclusive.

  Returns:
    The names of the layers frozen.
  """
  if stage is None:
    return []
  errors.check_choice('freeze_until', stage, STAGES)
  last = STAGES.index(stage)
  frozen = []
  for layer in backbone.layers:
    layer_stage = _stage_of(layer.name)
    if layer_stage is not None and STAGES.index(layer_stage) <= last:
      layer.trainable = False
      frozen.append(layer.name)
  if not frozen:
    raise errors.ConfigError(
        f'freeze_until={stage!r} matched no layer of '
        f'{backbone.name!r}: not a Keras ResNet50?')
  return frozen


def create_network(num_classes, image_size, weights='imagenet',
                   dropout_rate=0.0, seed=None, batch_norm='trained',
                   freeze_until_stage=None, batch_norm_momentum=None):
  """Builds ResNet50 (no top) + global average pooling + Dense head.

  Args:
    num_classes: Number of output logits.
    image_size: Side of the square input images.
    weights: 'imagenet', None or a path to a local ResNet50 no-top weights
      file.
    dropout_rate: Dropout before the head; 0 disables it.
    seed: Seeds the head's initializer and dropout.
    batch_norm: One of `BATCH_NORM_POLICIES`, for the backbone's BN layers.
    freeze_until_stage: None or one of `STAGES`: freeze the backbone up to
      and including that stage (its BN layers then run in inference mode).
    batch_norm_momentum: None or the BN layers' momentum (see
      `set_batch_norm_policy`).

  Returns:
    A functional `keras.Model` named 'network' mapping `[N, S, S, 3]` images
    in [0, 255] to float32 logits `[N, num_classes]`.
  """
  if num_classes <= 0 or image_size <= 0:
    raise errors.ConfigError(
        'num_classes and image_size must be positive. Received: '
        f'num_classes={num_classes}, image_size={image_size}')
  errors.check_fraction('dropout_rate', dropout_rate)
  weights = resolve_weights(weights)
  inputs = keras.Input(shape=(image_size, image_size, 3), name='images')
  x = ResNetPreprocessing(name='preprocessing')(inputs)
  try:
    backbone = keras.applications.ResNet50(
        include_top=False, weights=weights, input_shape=(image_size,
                                                         image_size, 3))
  except Exception as error:  # urllib raises several types when offline.
    if weights == 'imagenet':
      raise WeightsUnavailableError(_imagenet_weights_help()) from error
    raise
  # Same weights and arithmetic, one kernel per BatchNormalization layer
  # (keras_sft.batch_norm).
  backbone = batch_norm_module.fuse(backbone)
  set_batch_norm_policy(backbone, batch_norm, batch_norm_momentum)
  frozen = freeze_until(backbone, freeze_until_stage)
  if frozen:
    logging.info('Froze %d backbone layers up to stage %s.', len(frozen),
                 freeze_until_stage)
  x = backbone(x)
  x = keras.layers.GlobalAveragePooling2D(name='avg_pool')(x)
  if dropout_rate:
    x = keras.layers.Dropout(dropout_rate, seed=seed, name='dropout')(x)
  # float32 logits also under a mixed-precision policy: stable softmax/CE.
  outputs = keras.layers.Dense(
      num_classes,
      kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
      dtype='float32',
      name='head')(x)
  network = keras.Model(inputs, outputs, name='network')
  logging.info('Built ResNet50 (weights=%s) + Dense(%d): %d parameters.',
               weights, num_classes, network.count_params())
  return network


def create_model(num_classes, image_size, weights='imagenet',
                 dropout_rate=0.0, weight_decay=0.0, seed=None,
                 batch_norm='trained', freeze_until_stage=None,
                 backbone_multiplier=1.0, head_only_steps=0,
                 batch_norm_momentum=None):
  """Returns a `classifier.Classifier` around `create_network(...)`.

  Compile it as any Keras model, with a from-logits cross-entropy loss.
  `backbone_multiplier` and `head_only_steps` are the Classifier's (the head
  is the layer named 'head').
  """
  network = create_network(num_classes, image_size, weights=weights,
                           dropout_rate=dropout_rate, seed=seed,
                           batch_norm=batch_norm,
                           freeze_until_stage=freeze_until_stage,
                           batch_norm_momentum=batch_norm_momentum)
  return classifier.Classifier(network, weight_decay=weight_decay,
                               backbone_multiplier=backbone_multiplier,
                               head_only_steps=head_only_steps,
                               name='classifier')
