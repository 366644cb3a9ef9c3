r"""Throughput of keras-sft beside plain-Keras baselines, measured in one run.

    python benchmarks/run.py --out=benchmarks/results.json
    python benchmarks/run.py --quick      # seconds-sized, to keep it working

Each row is a median over repeats of images/s, next to a baseline measured in
the same process on the same shapes, and their ratio:

  input pipeline (train, augmentation on) vs our training step
  our train step (CE + λ·R(θ))           vs plain Keras ResNet50+Dense `fit`
  our train step                          vs our step with λ = 0 (no L2 term)
  our `evaluate`                          vs `model.predict`
  the exported SavedModel                 vs `model.predict`

Data are random uint8 images held in memory, so no download is needed and the
step timings exclude any disk reads.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_sft import distribution  # pylint: disable=g-import-not-at-top
from keras_sft import export  # pylint: disable=g-import-not-at-top
from keras_sft import input_pipeline  # pylint: disable=g-import-not-at-top
from keras_sft import models  # pylint: disable=g-import-not-at-top
from keras_sft import train  # pylint: disable=g-import-not-at-top

_NUM_CLASSES = 10


class _EpochTimer(keras.callbacks.Callback):
  """Records the wall time of each epoch."""

  def __init__(self):
    super().__init__()
    self.seconds = []

  def on_epoch_begin(self, epoch, logs=None):
    self._start = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    self.seconds.append(time.perf_counter() - self._start)


def _examples(count, image_size, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (count, image_size, image_size, 3), np.uint8)
  labels = rng.integers(0, _NUM_CLASSES, count).astype(np.int64)
  return images, labels


def _median_rate(images_per_repeat, seconds):
  return images_per_repeat / statistics.median(seconds)


def pipeline_rate(dataset, batch_size, steps, repeats):
  """Images/s of iterating `dataset` (after one warm-up pass)."""
  iterator = iter(dataset)
  for _ in range(steps):  # Warm-up: fills caches and the prefetch buffer.
    next(iterator)
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      next(iterator)
    seconds.append(time.perf_counter() - start)
  return _median_rate(steps * batch_size, seconds)


def fit_rate(model, batch, steps, repeats):
  """Images/s of `model.fit` on one in-memory batch repeated."""
  dataset = tf.data.Dataset.from_tensors(batch).repeat().prefetch(2)
  timer = _EpochTimer()
  # Epoch 0 traces the step; the median is over the later epochs.
  model.fit(dataset, epochs=repeats + 1, steps_per_epoch=steps,
            callbacks=[timer], verbose=0)
  return _median_rate(steps * len(batch[1]), timer.seconds[1:])


def call_rate(function, images, steps, repeats):
  """Images/s of `function(images)` called `steps` times per repeat."""
  function(images)  # Trace.
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      result = function(images)
    # Wait for the device to finish the last call.
    np.asarray(tf.nest.flatten(result)[0])
    seconds.append(time.perf_counter() - start)
  return _median_rate(steps * len(images), seconds)


def _ours(args, weight_decay):
  keras.utils.set_random_seed(0)
  with args.strategy.scope():
    model = models.create_model(_NUM_CLASSES, args.image_size, weights=None,
                                weight_decay=weight_decay)
    train.compile_model(model, keras.optimizers.SGD(0.01, momentum=0.9),
                        jit_compile=args.jit_compile)
  return model


def _plain_keras(args):
  keras.utils.set_random_seed(0)
  with args.strategy.scope():
    backbone = keras.applications.ResNet50(
        include_top=False, weights=None, pooling='avg',
        input_shape=(args.image_size, args.image_size, 3))
    outputs = keras.layers.Dense(_NUM_CLASSES, dtype='float32')(
        backbone.output)
    model = keras.Model(backbone.input, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=['accuracy'], jit_compile=args.jit_compile)
  return model


def run(args):
  """Measures every row; returns the results as a dict."""
  keras.mixed_precision.set_global_policy(args.precision)
  args.strategy = distribution.create_strategy(args.distribution)
  size, batch_size = args.image_size, args.batch_size
  images, labels = _examples(max(args.num_examples, batch_size), size)
  batch = (tf.constant(images[:batch_size], tf.float32),
           tf.constant(labels[:batch_size]))
  rows = []

  def add(name, rate, baseline_name, baseline_rate, target=None):
    rows.append({'name': name, 'images_per_second': rate,
                 'baseline': baseline_name,
                 'baseline_images_per_second': baseline_rate,
                 'ratio': rate / baseline_rate, 'target': target})

  ours = _ours(args, weight_decay=5e-5)
  ours_rate = fit_rate(ours, batch, args.steps, args.repeats)
  no_l2_rate = fit_rate(_ours(args, weight_decay=0.0), batch, args.steps,
                        args.repeats)
  plain_rate = fit_rate(_plain_keras(args), batch, args.steps, args.repeats)
  add('train step, ours (CE + λ·R)', ours_rate, 'plain Keras fit',
      plain_rate, target='>= 1.0')
  add('train step, ours (CE + λ·R)', ours_rate, 'ours with λ = 0',
      no_l2_rate, target='>= 0.98')

  examples = tf.data.Dataset.from_tensor_slices((images, labels))
  train_data = input_pipeline.make_train_dataset(
      examples, image_size=size, global_batch_size=batch_size)
  eval_data = input_pipeline.make_eval_dataset(
      examples, image_size=size, global_batch_size=batch_size).repeat()
  add('input pipeline, train', pipeline_rate(train_data, batch_size,
                                             args.pipeline_steps,
                                             args.repeats),
      'our train step', ours_rate, target='>= 20')
  add('input pipeline, eval', pipeline_rate(eval_data, batch_size,
                                            args.pipeline_steps,
                                            args.repeats),
      'our train step', ours_rate)

  predict_rate = call_rate(
      lambda x: ours.predict(x, batch_size=batch_size, verbose=0),
      batch[0], args.steps, args.repeats)
  evaluate_rate = call_rate(
      lambda x: ours.evaluate(x, batch[1], batch_size=batch_size, verbose=0),
      batch[0], args.steps, args.repeats)
  add('evaluate, ours', evaluate_rate, 'model.predict', predict_rate)

  with tempfile.TemporaryDirectory() as directory:
    export_dir = os.path.join(directory, 'export')
    export.export_saved_model(ours, export_dir, size,
                              [str(i) for i in range(_NUM_CLASSES)])
    serving = tf.saved_model.load(export_dir).signatures['serving_default']
    uint8_batch = tf.constant(images[:batch_size])
    serving_rate = call_rate(lambda x: serving(images=x), uint8_batch,
                             args.steps, args.repeats)
  add('serving, exported SavedModel (uint8 in)', serving_rate,
      'model.predict', predict_rate, target='>= 1.0')

  settings = {key: value for key, value in vars(args).items()
              if key != 'strategy'}
  settings['replicas'] = args.strategy.num_replicas_in_sync
  return {
      'settings': settings,
      'machine': {
          'platform': platform.platform(),
          'processor': platform.processor() or platform.machine(),
          'cpu_count': os.cpu_count(),
          'gpus': [d.name for d in tf.config.list_logical_devices('GPU')],
          'tensorflow': tf.__version__, 'keras': keras.__version__,
      },
      'date': time.strftime('%Y-%m-%d'),
      'rows': rows,
  }


def format_table(results):
  lines = [f'{"what":42} {"images/s":>10}  {"baseline":24} {"images/s":>10} '
           f'{"ratio":>7}  target']
  for row in results['rows']:
    lines.append(
        f'{row["name"]:42} {row["images_per_second"]:10.1f}  '
        f'{row["baseline"]:24} {row["baseline_images_per_second"]:10.1f} '
        f'{row["ratio"]:7.2f}  {row["target"] or ""}')
  return '\n'.join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--precision', default='float32',
                      choices=['float32', 'mixed_bfloat16', 'mixed_float16'])
  parser.add_argument('--jit_compile', type=lambda text: text == 'true',
                      default=False, help='true: XLA for each step.')
  parser.add_argument('--distribution', default='default',
                      choices=['default', 'one_device', 'mirrored'])
  parser.add_argument('--steps', type=int, default=10,
                      help='Timed steps per repeat.')
  parser.add_argument('--pipeline_steps', type=int, default=200,
                      help='Timed input-pipeline batches per repeat.')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--num_examples', type=int, default=4096)
  parser.add_argument('--quick', action='store_true',
                      help='Tiny sizes: checks the script works, not speed.')
  parser.add_argument('--out', default=None, help='Write JSON results here.')
  args = parser.parse_args(argv)
  if args.quick:
    args.batch_size, args.steps, args.pipeline_steps = 8, 2, 5
    args.repeats, args.num_examples = 2, 64
  return args


def main(argv=None):
  args = parse_args(argv)
  results = run(args)
  print(format_table(results))
  if args.out:
    with open(args.out, 'w') as file:
      json.dump(results, file, indent=2)
  return results


if __name__ == '__main__':
  main()
