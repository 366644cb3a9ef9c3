"""SavedModel export for serving, loadable without keras_sft installed.

The SavedModel holds each weight once (Keras' own `model.export` stores every
weight twice, keras-team/keras#23553) and the whole eval preprocessing:
`serving_default` takes uint8 RGB images `[N, H, W, 3]` of any size, resizes
them exactly as the eval pipeline does, and returns logits, probabilities,
class ids and class names.
"""

import logging
import os

import tensorflow as tf

from keras_sft import input_pipeline


class _ServingModule(tf.Module):
  """Tracks the model's variables once and serves it in a `tf.function`."""

  def __init__(self, model, image_size, class_names):
    super().__init__(name='serving')
    # The raw tf.Variables, tracked once. The Keras model itself must not be
    # an attribute: tracking it would store every weight a second time.
    self.model_variables = [variable.value for variable in model.variables]
    self._class_names = tf.constant(list(class_names), dtype=tf.string)
    self._image_size = image_size
    self._call = lambda images: model(images, training=False)

  @tf.function(input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.uint8, name='images')])
  def serve_images(self, images):
    images = input_pipeline.preprocess_for_eval(images, self._image_size)
    logits = tf.cast(self._call(images), tf.float32)
    class_ids = tf.argmax(logits, axis=-1, output_type=tf.int64)
    return {
        'logits': logits,
        'probabilities': tf.nn.softmax(logits, axis=-1),
        'class_ids': class_ids,
        'class_names': tf.gather(self._class_names, class_ids),
    }


def export_saved_model(model, export_dir, image_size, class_names):
  """Writes a SavedModel of `model` for TF Serving to `export_dir`.

  Args:
    model: A Keras model mapping float32 `[N, S, S, 3]` images in [0, 255] to
      logits.
    export_dir: Output directory; replaced atomically if it exists.
    image_size: S, the side the model expects.
    class_names: One name per class id.

  Returns:
    `export_dir`.
  """
  module = _ServingModule(model, image_size, class_names)
  temporary = export_dir.rstrip('/') + '.tmp'
  if tf.io.gfile.exists(temporary):
    tf.io.gfile.rmtree(temporary)
  tf.saved_model.save(
      module, temporary,
      signatures={'serving_default': module.serve_images})
  if tf.io.gfile.exists(export_dir):
    tf.io.gfile.rmtree(export_dir)
  os.replace(temporary, export_dir)
  logging.info('Exported a SavedModel to %s.', export_dir)
  return export_dir
