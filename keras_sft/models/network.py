"""The fine-tuning network: a backbone of `backbones.BACKBONES` and a head.

`Spec` is everything that shapes the network, one value; `create_network`
builds it: the backbone's preprocessing (float32), the backbone on fused
BatchNorm and depthwise kernels, the BatchNorm policy and frozen stages,
global average pooling, dropout and a float32 Dense head named 'head'.
`create_model` wraps it in the `classifier.Classifier` that trains it.
"""

import dataclasses
import logging

import keras

from keras_sft import errors
from keras_sft.models import backbones
from keras_sft.models import batch_norm as batch_norm_module
from keras_sft.models import classifier
from keras_sft.models import depthwise


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
  errors.check_choice('batch_norm', policy, backbones.BATCH_NORM_POLICIES)
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


def stage_of(layer_name, backbone_name, name=backbones.DEFAULT_MODEL):
  """The stage of backbone `name` a layer belongs to, or None.

  `backbone_name` is the Keras model's own name (its layers' prefix).
  """
  return backbones.family_of(name).stage_of(layer_name, backbone_name)


def freeze_until(backbone, stage, name=backbones.DEFAULT_MODEL):
  """Makes the layers of `name`'s stages up to `stage` non-trainable.

  Args:
    backbone: The Keras model `build_backbone(name, ...)` returns.
    stage: None (nothing frozen) or one of `backbones.stages(name)`,
      inclusive.
    name: A `BACKBONES` name.

  Returns:
    The names of the layers frozen.
  """
  if stage is None:
    return []
  backbones.check_freeze_until(name, stage)
  names = backbones.stages(name)
  last = names.index(stage)
  frozen = []
  for layer in backbone.layers:
    layer_stage = stage_of(layer.name, backbone.name, name)
    if layer_stage is not None and names.index(layer_stage) <= last:
      layer.trainable = False
      frozen.append(layer.name)
  if not frozen:
    raise errors.ConfigError(
        f'freeze_until={stage!r} matched no layer of '
        f'{backbone.name!r}: not a Keras {name}?')
  return frozen


def variable_stages(network, name=backbones.DEFAULT_MODEL):
  """The backbone stage of each trainable variable of `network`.

  A backbone layer of no stage (padding, the stem before the first named
  stage, a layer after the last) belongs to the stage of the layer before
  it, in the backbone's layer order; layers before the first stage belong
  to the first. Variables outside the backbone (the head) map to None.

  Args:
    network: A network of `build_network` (one `keras.Model` layer, the
      backbone).
    name: Its `BACKBONES` name.

  Returns:
    A dict from variable path to stage name or None, for every trainable
    variable.
  """
  [backbone] = [layer for layer in network.layers
                if isinstance(layer, keras.Model)]
  names = backbones.stages(name)
  stages = {}
  current = names[0]
  for layer in backbone.layers:
    current = stage_of(layer.name, backbone.name, name) or current
    for variable in layer.trainable_variables:
      stages[variable.path] = current
  result = {variable.path: stages.get(variable.path)
            for variable in network.trainable_variables}
  if len(result) != len(network.trainable_variables):
    raise ValueError('Trainable variables of the network share a path.')
  return result


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything that shapes the network: one value from config to builder.

  Attributes:
    backbone: The backbone's name, one of `backbones.BACKBONES`
      (`config.model`).
    image_size: Side of the square input images.
    weights: 'imagenet', None or a path to a local no-top weights file of
      `backbone`.
    dropout_rate: Dropout before the head; 0 disables it.
    seed: Seeds the head's initializer and dropout.
    batch_norm: One of `backbones.BATCH_NORM_POLICIES`.
    batch_norm_momentum: None or the BN layers' momentum (see
      `set_batch_norm_policy`).
    freeze_until: None or one of `backbones.stages(backbone)`: freeze the
      backbone up to and including that stage (its BN layers then run in
      inference mode).
  """
  backbone: str = backbones.DEFAULT_MODEL
  image_size: int = 224
  weights: object = 'imagenet'
  dropout_rate: float = 0.0
  seed: object = None
  batch_norm: str = 'trained'
  batch_norm_momentum: object = None
  freeze_until: object = None

  @classmethod
  def from_config(cls, config, pretrained=True):
    """The run's spec; `pretrained=False` builds without loading weights."""
    return cls(backbone=config.model, image_size=config.image_size,
               weights=config.weights if pretrained else None,
               dropout_rate=config.dropout_rate, seed=config.seed,
               batch_norm=config.batch_norm,
               batch_norm_momentum=config.batch_norm_momentum,
               freeze_until=config.freeze_until)


def build_network(num_classes, spec):
  """Builds a backbone (no top) + global average pooling + Dense head.

  Args:
    num_classes: Number of output logits.
    spec: A `Spec`.

  Returns:
    A functional `keras.Model` named 'network' mapping `[N, S, S, 3]` images
    in [0, 255] to float32 logits `[N, num_classes]`.
  """
  if num_classes <= 0 or spec.image_size <= 0:
    raise errors.ConfigError(
        'num_classes and image_size must be positive. Received: '
        f'num_classes={num_classes}, image_size={spec.image_size}')
  errors.check_fraction('dropout_rate', spec.dropout_rate)
  backbone_row = backbones.backbone_spec(spec.backbone)
  backbones.check_image_size(spec.backbone, spec.image_size)
  backbones.check_freeze_until(spec.backbone, spec.freeze_until)
  backbones.check_batch_norm_support(spec.backbone, spec.batch_norm,
                                     spec.batch_norm_momentum)
  weights = backbones.resolve_weights(spec.weights, spec.backbone)
  inputs = keras.Input(shape=(spec.image_size, spec.image_size, 3),
                       name='images')
  x = backbones.Preprocessing(backbone_row.preprocessing,
                              name='preprocessing')(inputs)
  backbone = backbones.load_backbone(spec.backbone, spec.image_size, weights)
  if backbones.family_of(spec.backbone).has_batch_norm:
    # Same weights and arithmetic, one kernel per BatchNormalization layer
    # (keras_sft.models.batch_norm).
    backbone = batch_norm_module.fuse(backbone)
  # ConvNeXt's depthwise Conv2D layers on the depthwise kernel instead of
  # one XLA function each (keras_sft.models.depthwise); same weights.
  backbone = depthwise.replace(backbone)
  set_batch_norm_policy(backbone, spec.batch_norm, spec.batch_norm_momentum)
  frozen = freeze_until(backbone, spec.freeze_until, spec.backbone)
  if frozen:
    logging.info('Froze %d backbone layers up to stage %s.', len(frozen),
                 spec.freeze_until)
  x = backbone(x)
  x = keras.layers.GlobalAveragePooling2D(name='avg_pool')(x)
  if spec.dropout_rate:
    x = keras.layers.Dropout(spec.dropout_rate, seed=spec.seed,
                             name='dropout')(x)
  # float32 logits also under a mixed-precision policy: stable softmax/CE.
  outputs = keras.layers.Dense(
      num_classes,
      kernel_initializer=keras.initializers.GlorotUniform(seed=spec.seed),
      dtype='float32',
      name='head')(x)
  network = keras.Model(inputs, outputs, name='network')
  logging.info('Built %s (weights=%s) + Dense(%d): %d parameters.',
               spec.backbone, weights, num_classes, network.count_params())
  return network


def create_network(num_classes, image_size, weights='imagenet',
                   dropout_rate=0.0, seed=None, batch_norm='trained',
                   freeze_until_stage=None, batch_norm_momentum=None,
                   model=backbones.DEFAULT_MODEL):
  """`build_network` with the `Spec` given as keywords, for library use."""
  return build_network(num_classes, Spec(
      backbone=model, image_size=image_size, weights=weights,
      dropout_rate=dropout_rate, seed=seed, batch_norm=batch_norm,
      batch_norm_momentum=batch_norm_momentum,
      freeze_until=freeze_until_stage))


def create_model(num_classes, image_size, weights='imagenet',
                 dropout_rate=0.0, weight_decay=0.0, seed=None,
                 batch_norm='trained', freeze_until_stage=None,
                 batch_norm_momentum=None, model=backbones.DEFAULT_MODEL):
  """Returns a `classifier.Classifier` around `create_network(...)`.

  Compile it as any Keras model, with a from-logits cross-entropy loss.
  """
  network = create_network(num_classes, image_size, weights=weights,
                           dropout_rate=dropout_rate, seed=seed,
                           batch_norm=batch_norm,
                           freeze_until_stage=freeze_until_stage,
                           batch_norm_momentum=batch_norm_momentum,
                           model=model)
  return classifier.Classifier(network, weight_decay=weight_decay,
                               name='classifier')
