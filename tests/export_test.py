"""The serving export: loads without keras_sft and matches the model."""

import json
import os
import subprocess
import sys

import numpy as np

import conftest
from configs import cifar10_resnet50
from keras_sft import input_pipeline
from keras_sft import models
from keras_sft import optimizers
from keras_sft import train

# Loads the SavedModel where `import keras_sft` fails, and serves a batch.
_SERVE_WITHOUT_KERAS_SFT = r'''
import sys
sys.modules['keras_sft'] = None  # Any import of keras_sft now fails.
import numpy as np
import tensorflow as tf
export_dir, images_path, outputs_path = sys.argv[1:]
serving = tf.saved_model.load(export_dir)
outputs = serving.signatures['serving_default'](
    images=tf.constant(np.load(images_path)))
np.savez(outputs_path, **{k: v.numpy().astype(str) if v.dtype == tf.string
                          else v.numpy() for k, v in outputs.items()})
'''


def _in_memory_model(workdir):
  config = cifar10_resnet50.get_config('smoke')
  model = models.create_model(10, config.image_size, weights=None)
  train.compile_model(model, optimizers.create_optimizer('sgd', 0.1))
  train.build(model, config.image_size)
  with open(os.path.join(workdir, 'checkpoints', 'checkpoint.json')) as file:
    latest = json.load(file)['file']
  model.load_weights(os.path.join(workdir, 'checkpoints', latest))
  return model, config.image_size


def test_export_serves_without_keras_sft_and_matches_the_model(smoke_run,
                                                               tmp_path):
  workdir, _ = smoke_run
  # Another size than the model's 32px: the export resizes inside.
  images = np.random.default_rng(0).integers(
      0, 256, (3, 45, 37, 3)).astype(np.uint8)
  np.save(tmp_path / 'images.npy', images)
  subprocess.run(
      [sys.executable, '-c', _SERVE_WITHOUT_KERAS_SFT,
       os.path.join(workdir, 'export'), str(tmp_path / 'images.npy'),
       str(tmp_path / 'outputs.npz')],
      check=True, cwd=str(tmp_path), env=conftest.cli_env(), timeout=300)
  served = np.load(tmp_path / 'outputs.npz')

  model, image_size = _in_memory_model(workdir)
  logits = model(input_pipeline.preprocess_for_eval(images, image_size),
                 training=False).numpy()
  np.testing.assert_allclose(served['logits'], logits, atol=1e-4)
  probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(served['probabilities'], probabilities,
                             atol=1e-5)
  np.testing.assert_array_equal(served['class_ids'], logits.argmax(-1))
  # tfds mock data names the CIFAR-10 classes '0'..'9'.
  np.testing.assert_array_equal(
      served['class_names'], logits.argmax(-1).astype(str))


def test_export_stores_each_weight_once(smoke_run):
  """Variables on disk ≤ 1.05 × the float32 bytes of the model's weights."""
  workdir, _ = smoke_run
  model, _ = _in_memory_model(workdir)
  weight_bytes = sum(4 * int(np.prod(v.shape)) for v in model.weights)
  variables_dir = os.path.join(workdir, 'export', 'variables')
  stored = sum(os.path.getsize(os.path.join(variables_dir, name))
               for name in os.listdir(variables_dir))
  assert stored <= 1.05 * weight_bytes, (stored, weight_bytes)
  assert stored >= weight_bytes
