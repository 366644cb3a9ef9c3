"""The fine-tuning network: a keras.applications backbone and a new head.

`config.model` names the backbone (`BACKBONES`, README "Backbones"):
ResNet50 (the default), ResNet101/152, ResNet50V2, EfficientNetV2 B0-B3 and
S, ConvNeXt Tiny/Small, MobileNetV3 Large, all built by `keras.applications`
without their top. One `Family` row per family says what differs: the input
preprocessing, the stage names of `freeze_until`, which layer types the
λ·R(θ) term decays, and whether it has BatchNormalization layers.

The network takes RGB images with values in [0, 255] (uint8 or float) and
applies the backbone's own preprocessing inside the graph, in float32, so
training, evaluation and the serving export all feed the backbone what its
weights expect. Families whose Keras constructor preprocesses inside the
model (EfficientNetV2, ConvNeXt, MobileNetV3) are built with
`include_preprocessing=False` and get the same Keras layers, in float32, in
the network's 'preprocessing' layer instead. BatchNormalization layers run
TensorFlow's fused kernel (`keras_sft.models.batch_norm`), with Keras' weights and
arithmetic, except under `batch_norm='synchronized'`, where Keras' own
cross-replica computation runs.
"""

import dataclasses
import os
import re

import h5py
import keras

from keras_sft import errors

# config.batch_norm: how the backbone's BatchNormalization layers train.
BATCH_NORM_POLICIES = ('trained', 'frozen', 'synchronized')

# The ImageNet mean and standard deviation of the 'torch' preprocessing.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Preprocessing modes of `Preprocessing`, from images in [0, 255]:
#   'caffe': RGB to BGR, minus the ImageNet mean (resnet.preprocess_input).
#   'tf': to [-1, 1] as x / 127.5 - 1 (resnet_v2.preprocess_input).
#   'torch_in_model': x / 255, minus the mean, over the std, as the Rescaling
#     and Normalization layers of EfficientNetV2 B0-B3.
#   'half_128': x / 128 - 1, the Rescaling layer of EfficientNetV2 S.
#   'half_127.5': x / 127.5 - 1, the Rescaling layer of MobileNetV3.
#   'imagenet_255': minus 255·mean, over 255·std, ConvNeXt's PreStem.
PREPROCESSING_MODES = ('caffe', 'tf', 'torch_in_model', 'half_128',
                       'half_127.5', 'imagenet_255')


def _resnet_stage(layer_name, backbone_name):
  del backbone_name  # ResNet layer names carry no model prefix.
  prefix = layer_name.split('_', 1)[0]
  if prefix == 'pool1':
    return 'conv1'
  if prefix == 'post':  # ResNet50V2's post_bn and post_relu, after conv5.
    return 'conv5'
  return prefix if prefix in _RESNET_STAGES else None


def _efficientnet_v2_stage(layer_name, backbone_name):
  del backbone_name
  match = re.match(r'(stem|top)_|(block\d+)[a-z]+_', layer_name)
  if not match:
    return None
  return match.group(1) or match.group(2)


def _convnext_stage(layer_name, backbone_name):
  name = layer_name[len(backbone_name) + 1:] if layer_name.startswith(
      backbone_name + '_') else layer_name
  if name.startswith('stem'):
    return 'stem'
  match = re.match(r'(?:stage|downsampling_block)_(\d+)', name)
  if match:  # Downsampling block i opens stage i.
    return f'stage_{match.group(1)}'
  if re.fullmatch(r'layer_normalization(_\d+)?', name):
    # The unnamed LayerNormalization after the last stage (no-top models).
    return 'stage_3'
  return None


# MobileNetV3Large: the first inverted-residual block of stages 2-5 (each
# halves the resolution); block 0 is stage 1, 'conv_1' (last 1x1) stage 5.
_MOBILENET_V3_LARGE_STAGE_STARTS = (1, 3, 6, 12)


def _mobilenet_v3_stage(layer_name, backbone_name):
  del backbone_name
  if layer_name in ('conv', 'conv_bn'):
    return 'stem'
  if layer_name.startswith('conv_1'):
    return 'stage5'
  match = re.match(r'expanded_conv_(?:(\d+)_)?', layer_name)
  if not match:
    return None
  block = int(match.group(1) or 0)
  stage = 1 + sum(block >= start for start in _MOBILENET_V3_LARGE_STAGE_STARTS)
  return f'stage{stage}'


_RESNET_STAGES = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5')


@dataclasses.dataclass(frozen=True)
class Family:
  """What keras-sft needs to know about one keras.applications family.

  Attributes:
    name: The family, e.g. 'resnet'.
    module: `keras.applications.<module>`, whose `preprocess_input` the
      network's preprocessing equals (for families that preprocess inside
      the model, that function is the identity and the model's own layers
      are the reference).
    stages: `freeze_until`'s stage names, in order.
    stage_of: `(layer_name, backbone_name)` -> stage or None (layers without
      weights of no stage: inputs, activations, additions).
    decayed_layer_types: Class names of the layers whose `kernel` λ·R(θ)
      decays (`classifier.decayed_variables`); everything else (biases,
      BatchNorm, LayerNorm, ConvNeXt's LayerScale) is not.
    has_batch_norm: False when the family has no BatchNormalization layer:
      `batch_norm` other than 'trained' and `batch_norm_momentum` are refused
      (precise BN then has nothing to re-estimate and costs nothing).
    include_preprocessing: The constructor takes `include_preprocessing`
      (passed False: the network's own float32 layer preprocesses).
  """
  name: str
  module: str
  stages: tuple
  stage_of: object
  decayed_layer_types: tuple
  has_batch_norm: bool = True
  include_preprocessing: bool = False


FAMILIES = {
    'resnet': Family(
        'resnet', 'resnet', _RESNET_STAGES, _resnet_stage, ('Conv2D',)),
    'resnet_v2': Family(
        'resnet_v2', 'resnet_v2', _RESNET_STAGES, _resnet_stage,
        ('Conv2D',)),
    'efficientnet_v2': Family(
        'efficientnet_v2', 'efficientnet_v2',
        ('stem', 'block1', 'block2', 'block3', 'block4', 'block5', 'block6',
         'top'), _efficientnet_v2_stage, ('Conv2D', 'DepthwiseConv2D'),
        include_preprocessing=True),
    'convnext': Family(
        'convnext', 'convnext',
        ('stem', 'stage_0', 'stage_1', 'stage_2', 'stage_3'),
        # Depthwise convolutions are grouped Conv2D layers, pointwise ones
        # Dense layers; LayerNormalization and LayerScale are not decayed.
        _convnext_stage, ('Conv2D', 'Dense'), has_batch_norm=False,
        include_preprocessing=True),
    'mobilenet_v3': Family(
        'mobilenet_v3', 'mobilenet_v3',
        ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'stage5'),
        _mobilenet_v3_stage, ('Conv2D', 'DepthwiseConv2D'),
        include_preprocessing=True),
}


@dataclasses.dataclass(frozen=True)
class Backbone:
  """One `config.model` value.

  Attributes:
    name: The `config.model` value.
    family: A `FAMILIES` key.
    constructor: The `keras.applications` function.
    preprocessing: A `PREPROCESSING_MODES` value.
    weights_file: The no-top ImageNet weights file Keras downloads (and looks
      for first in $KERAS_HOME/models/): the offline route's file name.
    cheapest: The member of its family the default tests run.
  """
  name: str
  family: str
  constructor: str
  preprocessing: str
  weights_file: str
  cheapest: bool = False


def _resnet(name, constructor, family='resnet', preprocessing='caffe',
            cheapest=False):
  return Backbone(name, family, constructor, preprocessing,
                  f'{name}_weights_tf_dim_ordering_tf_kernels_notop.h5',
                  cheapest)


def _efficientnet_v2(variant, cheapest=False):
  return Backbone(
      f'efficientnetv2_{variant}', 'efficientnet_v2',
      f'EfficientNetV2{variant.upper()}',
      'half_128' if variant == 's' else 'torch_in_model',
      f'efficientnetv2-{variant}_notop.h5', cheapest)


BACKBONES = {backbone.name: backbone for backbone in (
    _resnet('resnet50', 'ResNet50', cheapest=True),
    _resnet('resnet101', 'ResNet101'),
    _resnet('resnet152', 'ResNet152'),
    _resnet('resnet50v2', 'ResNet50V2', family='resnet_v2',
            preprocessing='tf', cheapest=True),
    _efficientnet_v2('b0', cheapest=True),
    _efficientnet_v2('b1'),
    _efficientnet_v2('b2'),
    _efficientnet_v2('b3'),
    _efficientnet_v2('s'),
    Backbone('convnext_tiny', 'convnext', 'ConvNeXtTiny', 'imagenet_255',
             'convnext_tiny_notop.h5', cheapest=True),
    Backbone('convnext_small', 'convnext', 'ConvNeXtSmall', 'imagenet_255',
             'convnext_small_notop.h5'),
    Backbone('mobilenetv3_large', 'mobilenet_v3', 'MobileNetV3Large',
             'half_127.5',
             'weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5',
             cheapest=True),
)}
DEFAULT_MODEL = 'resnet50'
# The smallest image side every `BACKBONES` constructor accepts without its
# top (keras.applications' `obtain_input_shape(min_size=32)`, and
# MobileNetV3's own check).
MIN_IMAGE_SIZE = 32



def backbone_spec(name):
  """The `Backbone` row of `config.model` value `name`."""
  errors.check_choice('model', name, tuple(BACKBONES))
  return BACKBONES[name]


def family_of(name):
  """The `Family` row of `config.model` value `name`."""
  return FAMILIES[backbone_spec(name).family]


def stages(name):
  """`freeze_until`'s stage names for `name`, in order."""
  return family_of(name).stages


# The first bytes of every HDF5 file (Keras' .h5 and .weights.h5 formats).
_HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'


class WeightsUnavailableError(errors.UnavailableError):
  """ImageNet weights are neither cached locally nor downloadable."""


def check_config(config):
  """Checks the model keys of the config; reads the weights file's header.

  Builds nothing (a strategy may not exist yet): whether a weights file fits
  the model is checked by `check_weights_fit` (train's start, before the
  workdir is claimed) and `create_network`, before its weights are loaded.
  """
  resolve_weights(config.weights, config.model)
  check_image_size(config.model, config.image_size)
  errors.check_fraction('dropout_rate', config.dropout_rate)
  errors.check_choice('batch_norm', config.batch_norm, BATCH_NORM_POLICIES)
  errors.check_fraction('batch_norm_momentum', config.batch_norm_momentum,
                        optional=True)
  check_freeze_until(config.model, config.freeze_until)
  check_batch_norm_support(config.model, config.batch_norm,
                           config.batch_norm_momentum)


def check_image_size(name, image_size):
  """`image_size` is at least `MIN_IMAGE_SIZE` (Keras' constructors refuse
  smaller inputs with a ValueError only when the model is built)."""
  if image_size < MIN_IMAGE_SIZE:
    raise errors.ConfigError(
        f'image_size={image_size!r} is too small for model={name!r}: '
        f'keras.applications backbones take images of at least '
        f'{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}. Use --config.image_size='
        f'{MIN_IMAGE_SIZE} or more (small images are resized up).')


def check_freeze_until(name, stage):
  """`stage` is None or one of `name`'s stage names."""
  if stage is not None and stage not in stages(name):
    raise errors.ConfigError(
        f'Unknown freeze_until for model={name!r}: freeze_until={stage!r}. '
        f'Expected None or one of {stages(name)}.')


def check_batch_norm_support(name, policy, momentum):
  """Refuses BN settings for a family without BatchNormalization layers."""
  if family_of(name).has_batch_norm:
    return
  if policy != 'trained' or momentum is not None:
    raise errors.ConfigError(
        f'model={name!r} has no BatchNormalization layers (its family '
        f'{family_of(name).name!r} normalizes with LayerNormalization), so '
        f'batch_norm={policy!r} and batch_norm_momentum={momentum!r} would '
        "do nothing. Use batch_norm='trained' and batch_norm_momentum=None.")


@keras.saving.register_keras_serializable(package='keras_sft')
class Preprocessing(keras.layers.Layer):
  """A backbone's input preprocessing, from [0, 255], in float32.

  Same arithmetic as the backbone's Keras code (its `preprocess_input`, or
  the Rescaling/Normalization layers its constructor puts inside the model),
  as one named, serializable layer; `mode` is one of `PREPROCESSING_MODES`.
  It computes in float32 unless given another `dtype`, also under a mixed
  policy: bfloat16 has a spacing of 0.5 to 1 between 64 and 255, so
  subtracting the mean there rounded the input and the mean (104 - 103.939
  gave 0, not 0.061). The next layer casts the exact result to its compute
  dtype. In a SavedModel it is plain TensorFlow ops (no Python object).
  """

  def __init__(self, mode='caffe', **kwargs):
    kwargs.setdefault('dtype', 'float32')
    super().__init__(**kwargs)
    errors.check_choice('preprocessing mode', mode, PREPROCESSING_MODES)
    self.mode = mode
    # Keras' own layers, as the constructors build them, in our dtype.
    dtype = self.dtype_policy
    self._keras_layers = {
        'caffe': [],
        'tf': [],
        'torch_in_model': [
            keras.layers.Rescaling(1.0 / 255, dtype=dtype),
            keras.layers.Normalization(
                mean=list(_IMAGENET_MEAN),
                variance=[std**2 for std in _IMAGENET_STD], dtype=dtype)],
        'half_128': [keras.layers.Rescaling(1.0 / 128.0, offset=-1,
                                            dtype=dtype)],
        'half_127.5': [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0,
                                              dtype=dtype)],
        'imagenet_255': [keras.layers.Normalization(
            mean=[mean * 255 for mean in _IMAGENET_MEAN],
            variance=[(std * 255)**2 for std in _IMAGENET_STD],
            dtype=dtype)],
    }[mode]

  def build(self, input_shape):
    for layer in self._keras_layers:
      layer.build(input_shape)

  def call(self, inputs):
    images = keras.ops.cast(inputs, self.compute_dtype)
    if self.mode == 'caffe':
      return keras.applications.resnet.preprocess_input(images)
    if self.mode == 'tf':
      return keras.applications.resnet_v2.preprocess_input(images)
    for layer in self._keras_layers:
      images = layer(images)
    return images

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), 'mode': self.mode}


def _imagenet_weights_help(name):
  keras_home = os.environ.get('KERAS_HOME',
                              os.path.join(os.path.expanduser('~'), '.keras'))
  file_name = backbone_spec(name).weights_file
  return (
      f'Could not download the ImageNet weights of {name}. Routes that need '
      'no network: (1) pass a local file with --config.weights=/path/to/'
      f'{file_name}; (2) put that file in '
      f'{os.path.join(keras_home, "models")}/ where Keras looks before '
      'downloading; (3) --config.weights=None to start from random weights.')


def resolve_weights(weights, name=DEFAULT_MODEL):
  """Checks a `weights` setting and returns what the constructor should get.

  Args:
    weights: 'imagenet', None (or 'none'/'') or a path to a local file.
    name: The `config.model` the file is for (named in errors).

  Raises:
    PathNotFoundError: a path that does not exist.
    ConfigError: a file that is not HDF5 (Keras' weights format), is
      truncated, or holds no layer weights.
  """
  if weights is None or str(weights).lower() in ('none', ''):
    return None
  if weights == 'imagenet':
    return 'imagenet'
  expected = backbone_spec(name).weights_file
  if not os.path.isfile(weights):
    raise errors.PathNotFoundError(
        f'weights={weights!r} is neither "imagenet", None, nor an existing '
        f'file. Expected a local {name} no-top weights file such as '
        f'{expected}.')
  with open(weights, 'rb') as file:
    if file.read(len(_HDF5_SIGNATURE)) != _HDF5_SIGNATURE:
      raise errors.ConfigError(
          f'weights={weights!r} is not an HDF5 weights file (.h5 or '
          f'.weights.h5, as Keras saves them). Expected a {name} no-top '
          f'weights file such as {expected}.')
  try:
    layers = _file_layers(weights)
  except (OSError, KeyError, ValueError) as error:
    # h5py refuses a file shorter than its header says (an interrupted
    # download or copy) when opening it.
    raise errors.ConfigError(
        f'weights={weights!r} cannot be read as a Keras weights file: it is '
        f'truncated or damaged ({error}). Copy the {name} no-top weights '
        f'file {expected} again.') from error
  if not layers:
    raise errors.ConfigError(
        f'weights={weights!r} is an HDF5 file without layer weights, not a '
        f'Keras weights file. Expected a {name} no-top weights file such '
        f'as {expected}.')
  return weights


def check_weights_fit(name, image_size, weights):
  """Fails unless `weights` can be loaded into `name`'s backbone.

  Builds the backbone with them (`load_backbone`), so a start refuses a
  file of another model, or ImageNet weights that cannot be downloaded,
  before it claims its workdir (the error's fix, --config.weights=PATH, then
  runs there). 'imagenet' is downloaded now, into Keras' cache, where the
  later build finds it. Nothing to do for None.
  """
  if resolve_weights(weights, name) is None:
    return
  check_image_size(name, image_size)
  load_backbone(name, image_size, weights)


def _file_layers(path):
  """`[(name, [shape, ...])]` of the weighted layers a weights file holds.

  Keras' legacy `.h5` files (the downloaded ImageNet ones) list their layers
  in order, and Keras loads them by that order; Keras 3 `.weights.h5` files
  hold one group per layer (`layers/<name>/vars/<i>`), which are visited in
  the file's order (names are Keras' per-class counters, not layer names).
  """
  with h5py.File(path, 'r') as file:
    root = file['model_weights'] if 'model_weights' in file else file
    if 'layer_names' in root.attrs:
      layers = []
      for name in root.attrs['layer_names']:
        name = name.decode() if isinstance(name, bytes) else name
        weight_names = root[name].attrs['weight_names']
        if len(weight_names):
          layers.append((name, [tuple(root[name][weight].shape)
                                for weight in weight_names]))
      return layers
    layers = []

    def visit(name, item):
      if isinstance(item, h5py.Group) and name.endswith('vars') and len(item):
        layers.append((name[:-len('/vars')], [
            tuple(item[str(index)].shape) for index in range(len(item))]))

    file.visititems(visit)
    return layers


def _model_layers(backbone):
  return [(layer.name, [tuple(weight.shape) for weight in layer.weights])
          for layer in backbone.layers if layer.weights]


def check_weights_file(backbone, path, name):
  """Fails unless the weights file at `path` fits `backbone`, layer by layer.

  A legacy `.h5` file must hold as many weighted layers as `backbone`, with
  the same weight shapes in the same order (what Keras' loader needs); a
  `.weights.h5` file the same multiset of weight shapes.

  Raises:
    ConfigError: naming the file's layers and the ones `name` expects.
  """
  expected = _model_layers(backbone)
  found = _file_layers(path)
  legacy = found and not found[0][0].startswith('layers/')
  if legacy:
    fits = [shapes for _, shapes in found] == [s for _, s in expected]
  else:
    fits = sorted(s for _, shapes in found for s in shapes) == sorted(
        s for _, shapes in expected for s in shapes)
  if fits:
    return

  def listing(layers):
    names = [name for name, _ in layers]
    shown = names[:4] + (['...'] if len(names) > 6 else []) + (
        names[-2:] if len(names) > 4 else [])
    return f'{len(names)} weighted layers ({", ".join(shown)})'

  raise errors.ConfigError(
      f'weights={path!r} does not fit model={name!r}: the file holds '
      f'{listing(found)}, {name} expects {listing(expected)} with other '
      f'weight shapes. Is it the weights file of another model? Expected '
      f'the {name} no-top weights file {backbone_spec(name).weights_file}'
      ' (or one saved from a keras-sft run of the same model).')


def build_backbone(name, image_size, weights=None):
  """`keras.applications.<constructor>(include_top=False, ...)` of `name`.

  With `include_preprocessing=False` where the constructor has it (the
  network preprocesses). `weights` as the constructor's.
  """
  spec = backbone_spec(name)
  kwargs = {}
  if family_of(name).include_preprocessing:
    kwargs['include_preprocessing'] = False
  constructor = getattr(keras.applications, spec.constructor)
  return constructor(include_top=False, weights=weights,
                     input_shape=(image_size, image_size, 3), **kwargs)


def load_backbone(name, image_size, weights):
  """`build_backbone` with `weights` ('imagenet', None or a local file).

  Raises:
    WeightsUnavailableError: 'imagenet' neither cached nor downloadable.
    ConfigError: a local file that does not fit `name`
      (`check_weights_file`), checked before it is loaded.
  """
  weights = resolve_weights(weights, name)
  try:
    backbone = build_backbone(
        name, image_size, 'imagenet' if weights == 'imagenet' else None)
  except Exception as error:  # urllib raises several types when offline.
    if weights == 'imagenet':
      raise WeightsUnavailableError(_imagenet_weights_help(name)) from error
    raise
  if weights not in (None, 'imagenet'):
    # What the constructors do with a path, after our check of the file.
    check_weights_file(backbone, weights, name)
    backbone.load_weights(weights)
  return backbone
