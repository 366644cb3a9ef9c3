"""The `litert` and `litert_int8` export formats: `model.tflite` for LiteRT.

`litert` keeps float32 weights; `litert_int8` is post-training
full-integer quantization (int8 weights and activations, uint8 input,
float32 logits), calibrated on `export_representative_images` images of the
run's training data, its cost in accuracy measured on the eval split and
written to the metadata. Metadata: `metadata.json` beside `model.tflite`.
Needs `pip install keras-sft[litert]`.
"""

import json
import os

import numpy as np
import tensorflow as tf

from keras_sft.data import pipeline
from keras_sft import errors
from keras_sft.export import graph
from keras_sft.export import packages

MODEL_FILE = 'model.tflite'
METADATA_FILE = 'metadata.json'
PACKAGES = ('ai_edge_litert.interpreter',)
EXTRA = 'litert'


def _require(format_name='litert'):
  return packages.require(format_name, PACKAGES, EXTRA)


def _converter(module):
  function = module.logits.get_concrete_function()
  return tf.lite.TFLiteConverter.from_concrete_functions([function], module)


def litert_model(module):
  """The float32 LiteRT flatbuffer (bytes) of a `logits_module`."""
  return _converter(module).convert()


def _write(module, directory, metadata, contents=None):
  _require()
  if contents is None:
    contents = litert_model(module)
  with open(os.path.join(directory, MODEL_FILE), 'wb') as file:
    file.write(contents)
  with open(os.path.join(directory, METADATA_FILE), 'w') as file:
    json.dump(metadata, file, indent=2)
    file.write('\n')


def saver(module, config, metadata, data):
  """`save(directory)` of the float format: writes, then runs it against TF."""
  del data  # Converted from the weights alone.

  def save(directory):
    _write(module, directory, metadata)
    graph.check_runtime('litert', os.path.join(directory, MODEL_FILE),
                        module, config.image_size, load)

  return save


def int8_saver(module, config, metadata, data):
  """`save(directory)` of the int8 format; calibrates and measures first.

  Args:
    module: A `graph.logits_module`.
    config: The run's ConfigDict.
    metadata: Its `graph.metadata`, completed here with `quantization`.
    data: The run's `pipeline.Data`; default `pipeline.from_config`.
  """
  data = data or pipeline.from_config(config)
  # All of the train split if it holds fewer.
  images = representative_images(data, config,
                                 config.export_representative_images)
  contents = quantize_int8(module, images)
  metadata['quantization'] = dict(
      representative_images=len(images),
      **quantization_report(module, contents, eval_batches(data, config)))
  return lambda directory: _write(module, directory, metadata, contents)


def representative_images(data, config, count):
  """`count` uint8 `[1, S, S, 3]` images of the run's training data.

  Fewer (all of them) if the train split holds fewer.

  Drawn (seeded by `config.seed`) from the train split of `data` (an
  `pipeline.Data`), prepared as `prepare_images` prepares a client's
  images.
  """
  examples = data.train_examples.shuffle(
      max(count, min(config.shuffle_buffer_size, 10 * count)),
      seed=config.seed).take(count)
  return [graph.prepare_images(image, config.image_size, config.resize_size)[None]
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


def kind(path):
  """'litert_int8' or 'litert': what the metadata beside `path` says."""
  metadata = read_metadata(path)
  return 'litert_int8' if metadata.get('format') == 'litert_int8' else (
      'litert')


def read_metadata(path):
  """The `metadata.json` beside a `model.tflite`; {} if there is none."""
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


class LiteRTModel:
  """A `.tflite` export (path or contents) in LiteRT: `logits(images)`, and
  `outputs(images)`, every output by name.

  It runs on `num_threads` CPU threads (default: all, as TensorFlow does).
  Outputs are found by their names in the model's signature, not by their
  position.
  """

  def __init__(self, model, num_threads=None):
    interpreter = _require()['ai_edge_litert.interpreter']
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




def load(path):
  """The `.tflite` export at `path` in LiteRT."""
  return LiteRTModel(path)
