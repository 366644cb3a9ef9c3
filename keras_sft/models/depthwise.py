"""Depthwise Conv2D layers (groups = channels) on TensorFlow's depthwise op.

ConvNeXt's 7x7 depthwise convolutions are `keras.layers.Conv2D` layers with
`groups` equal to their channels. Keras 3's TensorFlow backend runs every
grouped convolution in its own XLA-compiled function ("grouped convolutions
are broken on CPU without XLA", keras/src/backend/tensorflow/nn.py), on
every device: on this project's CPU ConvNeXt-Tiny's first such layer took
76 ms per call at batch 32 and 32px, against 0.8 ms for the same convolution
as one `tf.nn.depthwise_conv2d` (README "Backbones").

`Conv2D` here is Keras' layer with the same variables (kernel
`[kh, kw, 1, C]`), config and arithmetic; where the layer is depthwise
(groups = input channels = filters, channels-last, stride and dilation 1) it
calls `tf.nn.depthwise_conv2d` with the kernel viewed as `[kh, kw, C, 1]`,
elsewhere Keras' own code. It keeps Keras' class name, so weight files move
both ways (see `keras_sft.models.batch_norm`), and λ·R(θ) decays its kernel as any
Conv2D's.

`replace(model)` returns a copy of a functional model whose depthwise Conv2D
layers are these, with the same weights.
"""

import keras
import tensorflow as tf


def is_depthwise(layer):
  """A built channels-last `Conv2D` whose groups equal its channels."""
  return (isinstance(layer, keras.layers.Conv2D) and layer.groups > 1
          and layer.groups == layer.filters
          and layer.kernel.shape[-2] == 1
          and layer.data_format == 'channels_last'
          and tuple(layer.strides) == (1, 1)
          and tuple(layer.dilation_rate) == (1, 1))


@keras.saving.register_keras_serializable(package='keras_sft')
class Conv2D(keras.layers.Conv2D):
  """`keras.layers.Conv2D` on `tf.nn.depthwise_conv2d` when depthwise."""

  def call(self, inputs):
    if not is_depthwise(self):
      return super().call(inputs)
    kernel = tf.cast(self.kernel, self.compute_dtype)
    height, width, _, channels = kernel.shape
    outputs = tf.nn.depthwise_conv2d(
        tf.cast(inputs, self.compute_dtype),
        tf.reshape(kernel, [height, width, channels, 1]),
        strides=[1, 1, 1, 1], padding=self.padding.upper())
    if self.use_bias:
      outputs = tf.nn.bias_add(outputs,
                               tf.cast(self.bias, self.compute_dtype))
    if self.activation is not None:
      outputs = self.activation(outputs)
    return outputs


def _clone(layer):
  if type(layer) is keras.layers.Conv2D and is_depthwise(layer):  # pylint: disable=unidiomatic-typecheck
    return Conv2D.from_config(layer.get_config())
  return layer.__class__.from_config(layer.get_config())


def replace(model):
  """Returns a copy of functional `model` with depthwise `Conv2D` layers.

  Layer names, trainable flags and weights are kept; a model without
  depthwise Conv2D layers is returned as it is.

  Args:
    model: A functional `keras.Model`, such as
      `keras.applications.ConvNeXtTiny`.
  """
  if not any(type(layer) is keras.layers.Conv2D and is_depthwise(layer)  # pylint: disable=unidiomatic-typecheck
             for layer in model.layers):
    return model
  replaced = keras.models.clone_model(model, clone_function=_clone)
  replaced.set_weights(model.get_weights())
  return replaced
