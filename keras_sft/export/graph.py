"""The graph that ONNX and LiteRT convert, and its client-side contract.

`logits_module(model, S)` is a `tf.Module` whose `logits` takes uint8
`[N, S, S, 3]` and returns `{'logits': float32 [N, C]}` with the backbone's
preprocessing inside and no resize (ONNX Runtime has no kernel for TF's
antialiased resize), so a client resizes first, as `prepare_images` does.
`metadata` is the JSON object every converted format carries;
`check_runtime` runs a written model in its runtime against TensorFlow.
"""

import numpy as np
import tensorflow as tf

from keras_sft.data import augment
from keras_sft.export import saved_model
from keras_sft.models import classifier

# A float export is refused when its runtime's logits on random images differ
# from TensorFlow's by more than this x max |logits| (README "ONNX, LiteRT:
# input contract" has the measured differences; tests hold them to 1e-4).
CHECK_RELATIVE_TOLERANCE = 1e-3


class _LogitsModule(tf.Module):
  """`logits(images)`: uint8 `[N, S, S, 3]` → float32 logits (and
  probabilities), no resize."""

  def __init__(self, model, image_size, probabilities=True, temperature=1.0):
    super().__init__(name='logits')
    # The raw tf.Variables, tracked once (see saved_model._ServingModule).
    self.model_variables = [variable.value for variable in
                            classifier.serving_variables(model)]
    self._model = model
    self._probabilities = probabilities
    self._temperature = saved_model.check_temperature(temperature)
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
            'probabilities': tf.nn.softmax(
                saved_model.scaled_logits(logits, self._temperature),
                axis=-1)}


def prepare_images(images, image_size, resize_size=None):
  """Images of any size → the uint8 `[N, S, S, 3]` the formats take.

  The eval preprocessing of training (`augment.preprocess_for_eval`:
  resize and centre crop, or nothing for images of side S), rounded to
  uint8. Images already S x S pass unchanged.

  Args:
    images: uint8 `[N, H, W, 3]` (or one `[H, W, 3]`).
    image_size: S, the export's `image_size`.
    resize_size: The run's `resize_size` (in the metadata).
  """
  prepared = augment.preprocess_for_eval(images, image_size,
                                         resize_size)
  return tf.cast(tf.clip_by_value(tf.round(prepared), 0, 255), tf.uint8)


def _resize_rule(size, resize_size):
  """The client's resize, in words (see `prepare_images`)."""
  if resize_size:
    rule = f'resize to {size}x{size}'
  else:
    enlarged = int(round(size / augment.CROP_FRACTION))  # pylint: disable=protected-access
    rule = (f'resize to {enlarged}x{enlarged} and centre-crop '
            f'{size}x{size}')
  return (f'Images not {size}x{size}: {rule} (bilinear, antialiased), '
          'outside the model (keras_sft.export.graph.prepare_images; python -m '
          'keras_sft.predict does it), then round to uint8. The cast and '
          'normalization are inside the graph.')


def metadata(format_name, config, class_names, source,
             probabilities=True, calibration=None):
  """The JSON metadata of a converted format (module docstring of formats).

  `calibration`: None, or the run's temperature record; `temperature` (1
  without one) is what a client divides the logits by before the softmax
  (`python -m keras_sft.predict` does, also for litert_int8, which has no
  `probabilities` output).
  """
  size = config.image_size
  calibrated = saved_model.calibration_metadata(calibration)
  outputs = [{'name': 'logits', 'dtype': 'float32',
              'shape': [None, len(class_names)]}]
  if probabilities:
    outputs.append({'name': 'probabilities', 'dtype': 'float32',
                    'shape': [None, len(class_names)],
                    'definition': 'softmax(logits), float32'
                                  if calibrated['temperature'] == 1.0 else
                                  'softmax(logits / temperature), float32'})
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
      'max_image_pixels': config.max_image_pixels,
      'source': source,
      **calibrated,
  }


def logits_module(model, image_size, probabilities=True, temperature=1.0):
  """The graph every format but the SavedModel converts: a `tf.Module`.

  Its `logits` function takes uint8 `[N, S, S, 3]` and returns
  `{'logits': float32 [N, C], 'probabilities': float32 [N, C]}` (the
  softmax of those logits divided by `temperature`; left out with
  `probabilities=False`); `model` maps float32 images in [0, 255] to logits
  (preprocessing inside, as the run's model does).
  """
  return _LogitsModule(model, image_size, probabilities, temperature)


def check_runtime(format_name, path, module, image_size, load):
  """Runs the float export at `path` in its runtime against `module`.

  A converter can write a model its runtime refuses, or one that computes
  something else: tf2onnx logs the ops it cannot convert and writes the
  model anyway.

  Args:
    format_name: The format's name, for messages.
    path: The written model file.
    module: The `logits_module` it was converted from.
    image_size: S.
    load: The format's loader: `load(path).logits(uint8 images)`.

  Raises:
    RuntimeError: The model does not load or run, or its logits on two
      random images differ from TensorFlow's by more than
      `CHECK_RELATIVE_TOLERANCE` x max |logits|.
  """
  images = np.random.default_rng(0).integers(
      0, 256, (2, image_size, image_size, 3), dtype=np.uint8)
  expected = module.logits(tf.constant(images))['logits'].numpy()
  try:
    logits = load(path).logits(images)
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


