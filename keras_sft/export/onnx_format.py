"""The `onnx` export format: `model.onnx` for ONNX Runtime (tf2onnx).

Metadata: one `metadata_props` entry per key of `graph.metadata`, each
value JSON. Needs `pip install keras-sft[onnx]`.
"""

import json
import os

from tensorflow.python.framework import convert_to_constants  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.util import deprecation  # pylint: disable=g-direct-tensorflow-import
import tensorflow as tf

from keras_sft.export import graph
from keras_sft.export import packages

MODEL_FILE = 'model.onnx'
OPSET = 17
# To write (and check) a model, and to run one.
PACKAGES = ('tf2onnx', 'onnx', 'onnxruntime')
RUNTIME_PACKAGES = ('onnxruntime',)
EXTRA = 'onnx'


def _require(runtime_only=False):
  return packages.require('onnx', RUNTIME_PACKAGES if runtime_only else
                          PACKAGES, EXTRA)


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
  tf2onnx = _require()['tf2onnx']
  graph_def, input_name, outputs = _frozen_graph(module)
  renames = {tensor: name for name, tensor in outputs.items()}
  # tf2onnx freezes the (already frozen) graph again with TF1's
  # convert_variables_to_constants, which logs a deprecation warning.
  with deprecation.silence():
    proto, _ = tf2onnx.convert.from_graph_def(
        graph_def, input_names=[input_name], output_names=list(renames),
        opset=OPSET,
        tensors_to_rename={input_name: 'images', **renames})
  for key, value in (metadata or {}).items():
    proto.metadata_props.add(key=key, value=json.dumps(value))
  return proto


def saver(module, config, metadata, data):
  """`save(directory)`: writes `model.onnx`, then runs it against TF."""
  del data  # Converted from the weights alone.

  def save(directory):
    onnx = _require()['onnx']
    path = os.path.join(directory, MODEL_FILE)
    onnx.save(onnx_model(module, metadata), path)
    graph.check_runtime('onnx', path, module, config.image_size, load)

  return save


def read_metadata(path):
  """The metadata dict of a `model.onnx` (its `metadata_props`)."""
  onnxruntime = _require(runtime_only=True)['onnxruntime']
  session = onnxruntime.InferenceSession(path,
                                         providers=['CPUExecutionProvider'])
  return {key: json.loads(value) for key, value in
          session.get_modelmeta().custom_metadata_map.items()}


class OnnxModel:
  """An `.onnx` export in ONNX Runtime: `logits(uint8 images)`, and
  `outputs(images)`, every output by name."""

  def __init__(self, path):
    onnxruntime = _require(runtime_only=True)['onnxruntime']
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




def load(path):
  """The `.onnx` export at `path` in ONNX Runtime."""
  return OnnxModel(path)
