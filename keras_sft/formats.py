"""Exports beside the SavedModel: ONNX and LiteRT, float and int8.

`python -m keras_sft.export --format=...` (`keras_sft/export.py`) is the
command line; `keras_sft.serving` writes the SavedModel. Formats:

- `saved_model`: TF Serving's SavedModel (`keras_sft.serving`), any image
  size, the whole eval preprocessing inside.
- `onnx`: `model.onnx` for ONNX Runtime (opset 17, converted by tf2onnx).
- `litert`: `model.tflite` for LiteRT (`ai_edge_litert`), float32 weights.
- `litert_int8`: `model.tflite` with post-training full-integer quantization
  (int8 weights and activations), calibrated on
  `export_representative_images` images of the run's training data; its
  cost in accuracy is measured on the eval split at export.

Layout: `<export_base>/<format>/<version>/` beside the SavedModel versions
in `<export_base>/<version>/` (TF Serving ignores names that are not
integers), versioned and written atomically by `serving.write_version`: an
existing version is never replaced.

Input contract of onnx, litert and litert_int8, one graph input `images`:
uint8 RGB `[N, S, S, 3]` (NHWC, N free) with S = `image_size`; the graph
casts to float32 and applies the backbone's preprocessing itself. It holds
no resize (ONNX Runtime has no kernel for TF's antialiased resize,
`ScaleAndTranslate`), so a client resizes first, as `prepare_images` (and
`python -m keras_sft.predict`) does. Outputs: `logits`, float32 `[N, C]`
(also for litert_int8, whose graph dequantizes its last layer's int8
output), and in the float formats `probabilities`, float32 `[N, C]`: the
softmax of those float32 logits in the same graph, as the SavedModel's (not
in litert_int8, where TFLite would quantize the softmax to 8 bits and its
rows would not sum to 1).

Metadata (class names, the input and output, `image_size`, the run, and for
litert_int8 the measured accuracy) is a JSON object: in ONNX `metadata_props`
(one entry per key, each value JSON), for LiteRT in `metadata.json` beside
`model.tflite`. `read_metadata` reads either.

The optional packages are extras, not in the base install:
`pip install keras-sft[onnx]` (tf2onnx, onnx, onnxruntime) and
`pip install keras-sft[litert]` (ai-edge-litert). Without them the format
fails with one `errors.MissingDependencyError` naming the extra.
"""

import importlib
import json
import logging
import os

import ml_collections
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import convert_to_constants  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.util import deprecation  # pylint: disable=g-direct-tensorflow-import

from keras_sft import errors
from keras_sft import input_pipeline
from keras_sft import precision
from keras_sft import serving
from keras_sft import workdir as workdir_lib

# What `python -m keras_sft.export --format` accepts.
FORMATS = ('saved_model', 'onnx', 'litert', 'litert_int8')
# The model file in each version of a format.
MODEL_FILES = {'onnx': 'model.onnx', 'litert': 'model.tflite',
               'litert_int8': 'model.tflite'}
# LiteRT's metadata, beside `model.tflite`.
METADATA_FILE = 'metadata.json'
ONNX_OPSET = 17
# A float export is refused when its runtime's logits on random images differ
# from TensorFlow's by more than this x max |logits| (measured on ResNet50
# and the other backbones: < 4e-6; formats_test holds them to 1e-4).
CHECK_RELATIVE_TOLERANCE = 1e-3
# Packages each format needs to be written (and measured), and to be run.
_PACKAGES = {'onnx': ('tf2onnx', 'onnx', 'onnxruntime'),
             'litert': ('ai_edge_litert.interpreter',),
             'litert_int8': ('ai_edge_litert.interpreter',)}
_RUNTIME_PACKAGES = {'onnx': ('onnxruntime',),
                     'litert': ('ai_edge_litert.interpreter',),
                     'litert_int8': ('ai_edge_litert.interpreter',)}
# The extra of setup.cfg that installs them.
_EXTRAS = {'onnx': 'onnx', 'litert': 'litert', 'litert_int8': 'litert'}


def check_config(config):
  """Checks the format export keys of the config."""
  errors.check_integer(
      'export_representative_images', config.export_representative_images, 1,
      ' (training images that calibrate the litert_int8 export)')


def parse_formats(value):
  """`'onnx,litert'` or a list → a tuple of known formats, in order.

  Raises:
    ConfigError: An unknown or repeated format, or none.
  """
  if isinstance(value, str):
    value = value.split(',')
  names = [name.strip() for name in value if name.strip()]
  if not names:
    raise errors.ConfigError(f'Give at least one format of {FORMATS}. '
                             f'Received: format={value!r}')
  for name in names:
    errors.check_choice('format', name, FORMATS)
  if len(set(names)) != len(names):
    raise errors.ConfigError(f'A format is named twice. Received: '
                             f'format={",".join(names)!r}')
  return tuple(names)


def require(format_name, runtime_only=False):
  """Imports the packages of `format_name`; returns them by module name.

  Raises:
    MissingDependencyError: One is not installed; names the extra.
  """
  names = (_RUNTIME_PACKAGES if runtime_only else _PACKAGES).get(
      format_name, ())
  modules = {}
  for name in names:
    try:
      modules[name] = importlib.import_module(name)
    except ImportError as error:
      extra = _EXTRAS[format_name]
      raise errors.MissingDependencyError(
          f'The {format_name} format needs the Python package {name!r}, '
          f'which is not installed ({error}): pip install '
          f'keras-sft[{extra}]') from error
  return modules


class _LogitsModule(tf.Module):
  """`logits(images)`: uint8 `[N, S, S, 3]` → float32 logits (and
  probabilities), no resize."""

  def __init__(self, model, image_size, probabilities=True):
    super().__init__(name='logits')
    # The raw tf.Variables, tracked once (see serving._ServingModule).
    self.model_variables = [variable.value for variable in model.variables]
    self._model = model
    self._probabilities = probabilities
    self.logits = tf.function(
        self._logits, input_signature=[tf.TensorSpec(
            [None, image_size, image_size, 3], tf.uint8, name='images')])

  def _logits(self, images):
    logits = tf.cast(
        self._model(tf.cast(images, tf.float32), training=False), tf.float32)
    if not self._probabilities:
      return {'logits': logits}
    # From the float32 logits it returns, as the SavedModel does: the two
    # outputs agree whatever precision the network computed in.
    return {'logits': logits,
            'probabilities': tf.nn.softmax(logits, axis=-1)}


def prepare_images(images, image_size, resize_size=None):
  """Images of any size → the uint8 `[N, S, S, 3]` the formats take.

  The eval preprocessing of training (`input_pipeline.preprocess_for_eval`:
  resize and centre crop, or nothing for images of side S), rounded to
  uint8. Images already S x S pass unchanged.

  Args:
    images: uint8 `[N, H, W, 3]` (or one `[H, W, 3]`).
    image_size: S, the export's `image_size`.
    resize_size: The run's `resize_size` (in the metadata).
  """
  prepared = input_pipeline.preprocess_for_eval(images, image_size,
                                                resize_size)
  return tf.cast(tf.clip_by_value(tf.round(prepared), 0, 255), tf.uint8)


def _resize_rule(size, resize_size):
  """The client's resize, in words (see `prepare_images`)."""
  if resize_size:
    rule = f'resize to {size}x{size}'
  else:
    enlarged = int(round(size / input_pipeline._CROP_FRACTION))  # pylint: disable=protected-access
    rule = (f'resize to {enlarged}x{enlarged} and centre-crop '
            f'{size}x{size}')
  return (f'Images not {size}x{size}: {rule} (bilinear, antialiased), '
          'outside the model (keras_sft.formats.prepare_images; python -m '
          'keras_sft.predict does it), then round to uint8. The cast and '
          'normalization are inside the graph.')


def _metadata(format_name, config, class_names, source):
  size = config.image_size
  outputs = [{'name': 'logits', 'dtype': 'float32',
              'shape': [None, len(class_names)]}]
  if format_name != 'litert_int8':
    outputs.append({'name': 'probabilities', 'dtype': 'float32',
                    'shape': [None, len(class_names)],
                    'definition': 'softmax(logits), float32'})
  return {
      'format': format_name,
      'class_names': list(class_names),
      'image_size': size,
      'input': {
          'name': 'images', 'dtype': 'uint8', 'shape': [None, size, size, 3],
          'layout': 'NHWC', 'channels': 'RGB', 'range': [0, 255],
          'preprocessing': _resize_rule(size, config.resize_size),
      },
      # Kept for readers of the first metadata, which had only logits.
      'output': outputs[0],
      'outputs': outputs,
      'resize_size': config.resize_size,
      'top_k': config.export_top_k,
      'max_image_pixels': config.get('max_image_pixels'),
      'source': source,
  }


def logits_module(model, image_size, probabilities=True):
  """The graph every format but the SavedModel converts: a `tf.Module`.

  Its `logits` function takes uint8 `[N, S, S, 3]` and returns
  `{'logits': float32 [N, C], 'probabilities': float32 [N, C]}` (the
  softmax of those logits; left out with `probabilities=False`); `model`
  maps float32 images in [0, 255] to logits (preprocessing inside, as the
  run's model does).
  """
  return _LogitsModule(model, image_size, probabilities)


def _frozen_graph(module):
  """`(GraphDef, input name, {output: tensor name})` of `module.logits`,
  frozen.

  Frozen here rather than by `tf2onnx.convert.from_function`, which makes
  every captured tensor that is not a variable a graph input: Keras'
  Normalization layer (EfficientNetV2-B*, ConvNeXt) holds its mean and
  variance as such tensors, and the ONNX model asked for them. Freezing
  turns them into constants, as it does the variables.
  """
  function = module.logits.get_concrete_function()
  frozen = convert_to_constants.convert_variables_to_constants_v2(
      function, lower_control_flow=False, aggressive_inlining=True)
  graph_def = frozen.graph.as_graph_def(add_shapes=True)
  _replace_erfc(graph_def)
  # A dict's outputs are flattened in the order of its sorted keys.
  names = sorted(function.structured_outputs)
  return graph_def, frozen.inputs[0].name, {
      name: tensor.name for name, tensor in zip(names, frozen.outputs)}


def _replace_erfc(graph_def):
  """Rewrites each `Erfc(x)` as `1 - Erf(x)`, in place.

  TensorFlow's exact GELU (ConvNeXt) computes `0.5 x erfc(-x/sqrt(2))`;
  ONNX has Erf but no Erfc, and tf2onnx (1.17) does not convert it.
  """
  for node in list(graph_def.node):
    if node.op != 'Erfc':
      continue
    dtype = node.attr['T'].type
    erf = graph_def.node.add(name=f'{node.name}/erf', op='Erf',
                             input=list(node.input))
    erf.attr['T'].type = dtype
    one = graph_def.node.add(name=f'{node.name}/one', op='Const')
    one.attr['dtype'].type = dtype
    one.attr['value'].tensor.CopyFrom(tf.make_tensor_proto(
        1, dtype=tf.dtypes.as_dtype(dtype)))
    node.op = 'Sub'
    del node.input[:]
    node.input.extend([one.name, erf.name])


def onnx_model(module, metadata=None):
  """The ONNX `ModelProto` of a `logits_module`, `metadata` in its props."""
  tf2onnx = require('onnx')['tf2onnx']
  graph_def, input_name, outputs = _frozen_graph(module)
  renames = {tensor: name for name, tensor in outputs.items()}
  # tf2onnx freezes the (already frozen) graph again with TF1's
  # convert_variables_to_constants, which logs a deprecation warning.
  with deprecation.silence():
    proto, _ = tf2onnx.convert.from_graph_def(
        graph_def, input_names=[input_name], output_names=list(renames),
        opset=ONNX_OPSET,
        tensors_to_rename={input_name: 'images', **renames})
  for key, value in (metadata or {}).items():
    proto.metadata_props.add(key=key, value=json.dumps(value))
  return proto


def _converter(module):
  function = module.logits.get_concrete_function()
  return tf.lite.TFLiteConverter.from_concrete_functions([function], module)


def litert_model(module):
  """The float32 LiteRT flatbuffer (bytes) of a `logits_module`."""
  return _converter(module).convert()


def _write_onnx(module, directory, metadata):
  onnx = require('onnx')['onnx']
  onnx.save(onnx_model(module, metadata),
            os.path.join(directory, MODEL_FILES['onnx']))


def _write_litert(module, directory, metadata, contents=None):
  require('litert')
  if contents is None:
    contents = litert_model(module)
  with open(os.path.join(directory, MODEL_FILES['litert']), 'wb') as file:
    file.write(contents)
  with open(os.path.join(directory, METADATA_FILE), 'w') as file:
    json.dump(metadata, file, indent=2)
    file.write('\n')


def check_runtime(format_name, path, module, image_size):
  """Runs the float export at `path` in its runtime against `module`.

  A converter can write a model its runtime refuses, or one that computes
  something else: tf2onnx logs the ops it cannot convert and writes the
  model anyway.

  Raises:
    RuntimeError: The model does not load or run, or its logits on two
      random images differ from TensorFlow's by more than
      `CHECK_RELATIVE_TOLERANCE` x max |logits|.
  """
  images = np.random.default_rng(0).integers(
      0, 256, (2, image_size, image_size, 3), dtype=np.uint8)
  expected = module.logits(tf.constant(images))['logits'].numpy()
  try:
    logits = load(format_name, path).logits(images)
  except Exception as error:  # pylint: disable=broad-except
    raise RuntimeError(
        f'The {format_name} conversion of this model does not run in its '
        f'runtime ({type(error).__name__}: {error}). Nothing was written; '
        'export another format.') from error
  difference = float(np.abs(logits - expected).max())
  scale = float(np.abs(expected).max())
  # The absolute term lets an untrained network's ~0 logits pass.
  if not difference <= CHECK_RELATIVE_TOLERANCE * scale + 1e-6:
    raise RuntimeError(
        f'The {format_name} conversion of this model computes other logits '
        f'than TensorFlow: max |difference| {difference:.3g} on logits up '
        f'to {scale:.3g}, above {CHECK_RELATIVE_TOLERANCE:g} x that. '
        'Nothing was written; export another format.')


def representative_images(data, config, count):
  """`count` uint8 `[1, S, S, 3]` images of the run's training data.

  Fewer (all of them) if the train split holds fewer.

  Drawn (seeded by `config.seed`) from the train split of `data` (an
  `input_pipeline.Data`), prepared as `prepare_images` prepares a client's
  images.
  """
  examples = data.train_examples.shuffle(
      max(count, min(config.shuffle_buffer_size, 10 * count)),
      seed=config.seed).take(count)
  return [prepare_images(image, config.image_size, config.resize_size)[None]
          for image, _ in examples]


def quantize_int8(module, images):
  """A full-integer LiteRT model; uint8 input, float32 logits output.

  Args:
    module: A `logits_module`.
    images: Representative uint8 `[1, S, S, 3]` inputs (calibration).
  """
  converter = _converter(module)
  converter.optimizations = [tf.lite.Optimize.DEFAULT]
  converter.representative_dataset = lambda: ([image] for image in images)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  converter.inference_input_type = tf.uint8
  converter.inference_output_type = tf.float32
  return converter.convert()


def eval_batches(data, config):
  """`(uint8 images, labels)` numpy batches of the eval split of `data`.

  `config.eval_steps` batches (all if None), rounded to uint8 as
  `prepare_images` does.
  """
  batches = data.eval
  if config.eval_steps:
    batches = batches.take(config.eval_steps)
  for images, labels in batches:
    yield (tf.cast(tf.clip_by_value(tf.round(images), 0, 255),
                   tf.uint8).numpy(), labels.numpy())


def quantization_report(module, contents, batches):
  """Top-1 accuracy of the float and int8 models on `batches`.

  Returns:
    A dict: eval_images, float_accuracy, int8_accuracy, accuracy_change
    (int8 - float) and top1_agreement (same top-1 class).
  """
  runtime = LiteRTModel(contents)
  count = float_correct = int8_correct = agree = 0
  for images, labels in batches:
    float_top1 = module.logits(tf.constant(images))['logits'].numpy().argmax(
        -1)
    int8_top1 = runtime.logits(images).argmax(-1)
    count += len(labels)
    float_correct += int((float_top1 == labels).sum())
    int8_correct += int((int8_top1 == labels).sum())
    agree += int((float_top1 == int8_top1).sum())
  if not count:
    raise errors.DataError('The eval split gave no images to measure the '
                           'int8 model on.')
  return {
      'eval_images': count,
      'float_accuracy': float_correct / count,
      'int8_accuracy': int8_correct / count,
      'accuracy_change': (int8_correct - float_correct) / count,
      'top1_agreement': agree / count,
  }


def export_format(format_name, model, config, class_names, export_base,
                  source=None, data=None):
  """Writes the next version of one format of a run's model.

  Args:
    format_name: One of `FORMATS`.
    model: The run's Keras model (float32 `[N, S, S, 3]` in [0, 255] →
      logits), e.g. from `serving.restore_run_model`.
    config: The run's ConfigDict.
    class_names: One name per class id.
    export_base: The SavedModel's export base; other formats go to
      `<export_base>/<format>/`.
    source: JSON-able description of where the weights came from.
    data: For litert_int8, the run's `input_pipeline.Data` (calibration and
      the measured accuracy); default `input_pipeline.from_config(config)`.

  Returns:
    `(version, path, metadata)`: path is the version directory.
  """
  errors.check_choice('format', format_name, FORMATS)
  if format_name == 'saved_model':
    version, path = serving.export_version(
        model, export_base, config.image_size, class_names,
        top_k=config.export_top_k,
        max_image_pixels=config.get('max_image_pixels',
                                    serving._DEFAULT_MAX_IMAGE_PIXELS),  # pylint: disable=protected-access
        resize_size=config.resize_size)
    return version, path, None
  require(format_name)  # Before any conversion work.
  module = logits_module(model, config.image_size,
                         probabilities=format_name != 'litert_int8')
  metadata = _metadata(format_name, config, class_names, source)
  if format_name in ('onnx', 'litert'):
    write = _write_onnx if format_name == 'onnx' else _write_litert

    def save(directory):
      write(module, directory, metadata)
      check_runtime(format_name,
                    os.path.join(directory, MODEL_FILES[format_name]),
                    module, config.image_size)
  else:
    data = data or input_pipeline.from_config(config)
    # All of the train split if it holds fewer.
    images = representative_images(data, config,
                                    config.export_representative_images)
    contents = quantize_int8(module, images)
    metadata['quantization'] = dict(
        representative_images=len(images),
        **quantization_report(module, contents, eval_batches(data, config)))
    save = lambda directory: _write_litert(module, directory, metadata,
                                           contents)
  version, path = serving.write_version(
      os.path.join(export_base, format_name), save)
  logging.info('Exported %s version %d to %s.', format_name, version, path)
  return version, path, metadata


def export_run(workdir, formats=('saved_model',), checkpoint='best',
               export_base=None, top_k=None):
  """Exports the next version of each format of the run in `workdir`.

  The model is restored once (`serving.restore_run_model`); twice for a
  run in mixed precision that exports a SavedModel (computing as the run
  did) and another format (computing in float32).

  Args:
    workdir: A run directory.
    formats: Names of `FORMATS`, or one comma-separated string.
    checkpoint: 'best' or 'last'; see `serving.restore_run_model`.
    export_base: The SavedModel's versions go here, the other formats' to
      `<export_base>/<format>/`; default `<workdir>/export`.
    top_k: Classes in the top-k outputs (the SavedModel's signatures; the
      metadata of the others, for predict); default `config.export_top_k`.

  Returns:
    A list of `(format, version, path, metadata)`, in the order given.
  """
  formats = parse_formats(formats)
  for name in formats:
    require(name)  # A missing extra fails before the model is restored.
  base = export_base or workdir_lib.Workdir(workdir).export
  run_config = workdir_lib.Workdir(workdir).read_config()
  # A config.json edited wrongly, or data that is gone, fails before any
  # format is written.
  data = None
  if 'litert_int8' in formats:
    check_config(ml_collections.ConfigDict(run_config))
    data = input_pipeline.from_config(ml_collections.ConfigDict(run_config))
  # The SavedModel computes in the run's precision, as its evaluation did;
  # the other formats in float32 (what converters and runtimes expect, and
  # int8 is calibrated from float32). The run's weights are float32 anyway.
  run_precision = run_config['precision']
  mixed = precision.resolve_policy(run_precision) != 'float32'
  restored = {}
  exported = []
  for name in formats:
    override = 'float32' if mixed and name != 'saved_model' else None
    if override not in restored:
      restored[override] = serving.restore_run_model(workdir, checkpoint,
                                                     precision=override)
    model, config, class_names, weights = restored[override]
    if top_k is not None:
      config.export_top_k = top_k
    source = {'workdir': os.path.abspath(workdir), 'checkpoint': checkpoint,
              'weights': os.path.basename(weights)}
    exported.append((name,) + export_format(name, model, config, class_names,
                                            base, source, data))
  return exported


def resolve_model(path):
  """`(format, model file or SavedModel directory)` of an export path.

  `path` is a model file (`.onnx`, `.tflite`), a version directory of any
  format, or a folder of versions (its newest version is used): the
  SavedModel export base, or `<export base>/<format>`.

  Raises:
    PathNotFoundError: None of these.
  """
  if os.path.isfile(path):
    if path.endswith('.onnx'):
      return 'onnx', path
    if path.endswith('.tflite'):
      return _litert_kind(path), path
  elif os.path.isdir(path):
    if os.path.exists(os.path.join(path, 'saved_model.pb')):
      return 'saved_model', path
    for name in ('onnx', 'litert'):
      file = os.path.join(path, MODEL_FILES[name])
      if os.path.isfile(file):
        return (name if name == 'onnx' else _litert_kind(file)), file
    versions = serving.list_versions(path)
    if versions:
      return resolve_model(os.path.join(path, str(versions[-1])))
  raise errors.PathNotFoundError(
      f'{path!r} is neither a model file (.onnx, .tflite), nor a version '
      'directory of an export, nor a folder of integer versions (such as '
      '<workdir>/export or <workdir>/export/onnx).')


def _litert_kind(path):
  metadata = _litert_metadata(path)
  return 'litert_int8' if metadata.get('format') == 'litert_int8' else (
      'litert')


def _litert_metadata(path):
  sidecar = os.path.join(os.path.dirname(path), METADATA_FILE)
  if not os.path.exists(sidecar):
    return {}
  with open(sidecar) as file:
    try:
      metadata = json.load(file)
    except ValueError as error:
      raise errors.DataError(
          f'{sidecar} is not JSON ({error}). Export the run again: python -m '
          'keras_sft.export --workdir=WORKDIR --format=litert') from error
  return metadata if isinstance(metadata, dict) else {}


def check_metadata(runtime, metadata, path, format_name):
  """Raises a DataError unless `metadata` describes the model `runtime`.

  Its `image_size` must be the side of the model's input (a LiteRT model of
  a network that pools globally runs on any size, so a wrong one would
  silently serve wrongly resized images), and it must name one class per
  logit.
  """
  names = metadata.get('class_names')
  size = metadata.get('image_size')
  again = ('Export the run again: python -m keras_sft.export '
           f'--workdir=WORKDIR --format={format_name}')
  if not metadata:
    where = ('its metadata_props' if format_name == 'onnx' else
             f'{METADATA_FILE} beside it')
    raise errors.DataError(f'{path} has no keras_sft metadata ({where}). '
                           f'{again}')
  if not isinstance(names, list) or not names:
    raise errors.DataError(f'The metadata of {path} has no class names. '
                           f'{again}')
  _, height, width, _ = runtime.input_shape
  if (height, width) != (size, size):
    raise errors.DataError(
        f'The metadata of {path} says image_size={size!r}, but the model '
        f'takes {height}x{width} images. {again}')
  if runtime.output_shape[-1] != len(names):
    raise errors.DataError(
        f'The metadata of {path} has {len(names)} class names, but the model '
        f'gives {runtime.output_shape[-1]} logits. {again}')


def read_metadata(format_name, path):
  """The metadata dict of an ONNX or LiteRT model file (see above)."""
  if format_name == 'onnx':
    onnx = require('onnx', runtime_only=True)['onnxruntime']
    session = onnx.InferenceSession(path, providers=['CPUExecutionProvider'])
    return {key: json.loads(value) for key, value in
            session.get_modelmeta().custom_metadata_map.items()}
  return _litert_metadata(path)


class OnnxModel:
  """An `.onnx` export in ONNX Runtime: `logits(uint8 images)`, and
  `outputs(images)`, every output by name."""

  def __init__(self, path):
    onnxruntime = require('onnx', runtime_only=True)['onnxruntime']
    self._session = onnxruntime.InferenceSession(
        path, providers=['CPUExecutionProvider'])
    self._input = self._session.get_inputs()[0].name
    outputs = {output.name: output for output in self._session.get_outputs()}
    self.output_names = tuple(outputs)
    # [N, S, S, 3] and [N, C] (the logits'); a free dimension is a string or
    # None.
    self.input_shape = list(self._session.get_inputs()[0].shape)
    self.output_shape = list(outputs['logits'].shape)

  def outputs(self, images):
    values = self._session.run(list(self.output_names), {self._input: images})
    return dict(zip(self.output_names, values))

  def logits(self, images):
    return self._session.run(['logits'], {self._input: images})[0]


class LiteRTModel:
  """A `.tflite` export (path or contents) in LiteRT: `logits(images)`, and
  `outputs(images)`, every output by name.

  It runs on `num_threads` CPU threads (default: all, as TensorFlow does).
  Outputs are found by their names in the model's signature, not by their
  position.
  """

  def __init__(self, model, num_threads=None):
    interpreter = require('litert', runtime_only=True)[
        'ai_edge_litert.interpreter']
    source = ({'model_content': model} if isinstance(model, bytes) else
              {'model_path': model})
    self._interpreter = interpreter.Interpreter(
        num_threads=num_threads or os.cpu_count(), **source)
    self._input = self._interpreter.get_input_details()[0]['index']
    # The signature's output names → tensor indices (the converter names
    # the tensors themselves StatefulPartitionedCall:i).
    self._outputs = {
        name: self._output_index(name)
        for name in self._interpreter.get_signature_list()[
            'serving_default']['outputs']}
    self.output_names = tuple(self._outputs)
    self._batch = None
    # [N, S, S, 3] and [N, C] (the logits'); the free batch dimension is -1.
    self.input_shape = [int(side) for side in self._interpreter
                        .get_input_details()[0]['shape_signature']]
    self.output_shape = [
        int(side) for side in self._details(self._outputs['logits'])[
            'shape_signature']]

  def _output_index(self, name):
    runner = self._interpreter.get_signature_runner('serving_default')
    return runner.get_output_details()[name]['index']

  def _details(self, index):
    return next(details for details in self._interpreter.get_output_details()
                if details['index'] == index)

  def outputs(self, images):
    if self._batch != len(images):
      self._interpreter.resize_tensor_input(self._input, list(images.shape))
      self._interpreter.allocate_tensors()
      self._batch = len(images)
    self._interpreter.set_tensor(self._input, images)
    self._interpreter.invoke()
    return {name: np.array(self._interpreter.get_tensor(index))
            for name, index in self._outputs.items()}

  def logits(self, images):
    return self.outputs(images)['logits']


def load(format_name, path):
  """The runtime of an ONNX or LiteRT export: an object with `logits` and
  `outputs`."""
  if format_name == 'onnx':
    return OnnxModel(path)
  return LiteRTModel(path)
