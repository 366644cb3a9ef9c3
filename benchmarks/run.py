r"""Throughput of keras-sft beside plain-Keras baselines, measured in one run.

    python benchmarks/run.py --out=benchmarks/results.json
    python benchmarks/run.py --quick      # seconds-sized, to keep it working
    python benchmarks/run.py --model=convnext_tiny   # the rows for one backbone
    python benchmarks/run.py --model=resnet50,efficientnetv2_b0,convnext_tiny

Each row gives images/s (the median repeat) next to a baseline measured in the
same process on the same shapes, and their speed ratio (> 1: faster than the
baseline). Candidates and their baselines run interleaved, one short repeat
each per round, and the ratio is the median over rounds of the per-round
ratios, so a slow phase of a shared machine does not land on one side only.
Rows:

  input pipeline (train, augmentation on) vs our training step
  our train step (CE + λ·R(θ))           vs plain Keras ResNet50+Dense `fit`
  our train step                          vs our step with λ = 0 (no L2 term)
  our `evaluate`                          vs `model.predict`
  the exported SavedModel                 vs `model.predict`

and a second table, one row per export format (ONNX in ONNX Runtime, LiteRT
float32 and int8 in LiteRT; `keras_sft.export.formats`, a format is skipped with a
note when its extra is not installed): its file size against the float32
weights, images/s against the SavedModel (interleaved as above, uint8
batches of the model's side), and on the same images the max |Δ logits|
and top-1 agreement with the SavedModel. The model has random weights and
the int8 model is calibrated on the random images: the int8 numbers of a
trained model on its own data are what `--format=litert_int8` measures and
writes into its metadata.

`--model=NAME` (a `config.model` value, default resnet50) measures these rows
for that backbone (the plain-Keras baseline is the same keras.applications
constructor). With several comma-separated names it measures, per backbone,
the training step and the exported SavedModel, interleaved, each as images/s
and as a speed ratio to the first name (README "Backbones").

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

from configs import default as default_lib  # pylint: disable=g-import-not-at-top
from keras_sft.data import pipeline  # pylint: disable=g-import-not-at-top
from keras_sft import errors  # pylint: disable=g-import-not-at-top
from keras_sft.export import formats  # pylint: disable=g-import-not-at-top
from keras_sft.export import graph  # pylint: disable=g-import-not-at-top
from keras_sft.export import litert_format  # pylint: disable=g-import-not-at-top
from keras_sft.export import onnx_format  # pylint: disable=g-import-not-at-top
from keras_sft.export import saved_model  # pylint: disable=g-import-not-at-top
from keras_sft.models import backbones  # pylint: disable=g-import-not-at-top
from keras_sft.models import precise_bn  # pylint: disable=g-import-not-at-top
from keras_sft.training import distribution  # pylint: disable=g-import-not-at-top
from keras_sft.training import recipe  # pylint: disable=g-import-not-at-top

_NUM_CLASSES = 10


class _StepTimer(keras.callbacks.Callback):
  """Times a `fit` call from its first step's start to its last step's end.

  Excludes what `fit` does before the first step and after the last one
  (iterator set-up and teardown; on this CPU the teardown sometimes takes
  2.5 s), which is not training throughput.
  """

  def __init__(self, steps):
    super().__init__()
    self.steps = steps

  def on_train_batch_begin(self, batch, logs=None):
    if batch == 0:
      self.start = time.perf_counter()

  def on_train_batch_end(self, batch, logs=None):
    if batch == self.steps - 1:
      float(logs['loss'])  # Waits for an accelerator to finish the step.
      self.seconds = time.perf_counter() - self.start


def _examples(count, image_size, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (count, image_size, image_size, 3), np.uint8)
  labels = rng.integers(0, _NUM_CLASSES, count).astype(np.int64)
  return images, labels


def interleaved(timers, repeats):
  """Calls each of `timers` once per round, `repeats` rounds; returns times.

  The order rotates every round and each round is short, so a slow phase of
  a shared machine (seen here: seconds-long, up to 2x) hits every candidate
  alike instead of whichever happened to run then.

  Args:
    timers: name -> function() returning the seconds of one timed repeat.
    repeats: Number of rounds.

  Returns:
    name -> list of seconds, one per round.
  """
  names = list(timers)
  seconds = {name: [] for name in names}
  for round_index in range(repeats):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      seconds[name].append(timers[name]())
  return seconds


def rate(images_per_repeat, seconds):
  """Images/s of the median repeat."""
  return images_per_repeat / statistics.median(seconds)


def paired_ratio(seconds, baseline_seconds):
  """Median over rounds of (baseline time / time): a speed ratio, > 1 faster.

  Each round's pair ran back to back, so the ratio cancels the machine's
  slow drifts that a ratio of two medians keeps.
  """
  return statistics.median(
      base / own for own, base in zip(seconds, baseline_seconds))


def pipeline_seconds(dataset, steps):
  """Returns a timer of `steps` batches of `dataset` (after a warm-up pass)."""
  iterator = iter(dataset)
  for _ in range(steps):  # Warm-up: fills caches and the prefetch buffer.
    next(iterator)

  def timer():
    start = time.perf_counter()
    for _ in range(steps):
      next(iterator)
    return time.perf_counter() - start

  return timer


def fit_seconds(model, batch, steps):
  """Returns a timer of `steps` training steps of `model.fit` on `batch`."""
  dataset = tf.data.Dataset.from_tensors(batch).repeat().prefetch(2)
  model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0)  # Traces.

  def timer():
    step_timer = _StepTimer(steps)
    model.fit(dataset, epochs=1, steps_per_epoch=steps,
              callbacks=[step_timer], verbose=0)
    return step_timer.seconds

  return timer


def call_seconds(function, images, steps):
  """Returns a timer of `steps` calls of `function(images)`."""
  function(images)  # Traces.

  def timer():
    start = time.perf_counter()
    for _ in range(steps):
      result = function(images)
    # Waits for the device to finish the last call.
    np.asarray(tf.nest.flatten(result)[0])
    return time.perf_counter() - start

  return timer


def _ours(args, weight_decay, model=None):
  """Our model as a run builds it (`recipe.build_model`), random weights."""
  keras.utils.set_random_seed(0)
  config = default_lib.get_config()
  config.model = model or args.models[0]
  config.weights = None
  config.image_size = args.image_size
  config.global_batch_size = args.batch_size
  config.weight_decay = weight_decay
  config.precision = args.precision
  config.jit_compile = str(args.jit_compile)  # 'True' or 'False'
  # A constant learning rate of 0.01, as the plain-Keras baseline's.
  plan = recipe.Plan(steps_per_epoch=1, total_steps=10**9, warmup_steps=0,
                     peak_learning_rate=0.01, head_only_steps=0)
  config.lr_schedule = 'step'
  config.lr_boundary_fractions = (0.999999,)
  with args.strategy.scope():
    return recipe.build_model(config, _NUM_CLASSES, plan)


def _plain_keras(args):
  keras.utils.set_random_seed(0)
  constructor = getattr(keras.applications,
                        backbones.backbone_spec(args.models[0]).constructor)
  with args.strategy.scope():
    backbone = constructor(
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


def _backbone_rows(args, batch, uint8_batch, add):
  """Train step and export of each of `args.models`, against the first."""
  timers = {}
  with tempfile.TemporaryDirectory() as directory:
    for model in args.models:
      ours = _ours(args, weight_decay=5e-5, model=model)
      timers[f'train {model}'] = fit_seconds(ours, batch, args.steps)
      export_dir = os.path.join(directory, model)
      saved_model.export_saved_model(ours, export_dir, args.image_size,
                                     [str(i) for i in range(_NUM_CLASSES)])
      signature = tf.saved_model.load(
          export_dir).signatures['serving_default']
      timers[f'serving {model}'] = call_seconds(
          lambda x, signature=signature: signature(images=x), uint8_batch,
          args.steps)
    seconds = interleaved(timers, args.repeats)
  images_per_repeat = args.steps * args.batch_size
  first = args.models[0]
  for kind in ('train', 'serving'):
    base = seconds[f'{kind} {first}']
    for model in args.models:
      own = seconds[f'{kind} {model}']
      add(f'{kind}, {model}', rate(images_per_repeat, own),
          f'{kind}, {first}', rate(images_per_repeat, base),
          paired_ratio(own, base))


def run(args):
  """Measures every row; returns the results as a dict."""
  keras.mixed_precision.set_global_policy(args.precision)
  args.strategy = distribution.create_strategy(args.distribution)
  size, batch_size = args.image_size, args.batch_size
  images, labels = _examples(max(args.num_examples, batch_size), size)
  batch = (tf.constant(images[:batch_size], tf.float32),
           tf.constant(labels[:batch_size]))
  rows = []

  def add(name, images_per_second, baseline, baseline_images_per_second,
          ratio, target=None):
    rows.append({'name': name, 'images_per_second': images_per_second,
                 'baseline': baseline,
                 'baseline_images_per_second': baseline_images_per_second,
                 'ratio': ratio, 'target': target})

  if len(args.models) > 1:
    _backbone_rows(args, batch, tf.constant(images[:batch_size]), add)
    return _results(args, rows)

  # Training: ours, ours without the λ·R(θ) term, plain Keras, interleaved.
  ours = _ours(args, weight_decay=5e-5)
  train_seconds = interleaved({
      'ours': fit_seconds(ours, batch, args.steps),
      'no_l2': fit_seconds(_ours(args, weight_decay=0.0), batch, args.steps),
      'plain': fit_seconds(_plain_keras(args), batch, args.steps),
  }, args.repeats)
  images_per_repeat = args.steps * batch_size
  ours_rate = rate(images_per_repeat, train_seconds['ours'])
  add('train step, ours (CE + λ·R)', ours_rate, 'plain Keras fit',
      rate(images_per_repeat, train_seconds['plain']),
      paired_ratio(train_seconds['ours'], train_seconds['plain']),
      target='>= 1.0')
  add('train step, ours (CE + λ·R)', ours_rate, 'ours with λ = 0',
      rate(images_per_repeat, train_seconds['no_l2']),
      paired_ratio(train_seconds['ours'], train_seconds['no_l2']),
      target='>= 0.98')

  # Input pipelines, against the training step measured above.
  examples = tf.data.Dataset.from_tensor_slices((images, labels))
  train_data = pipeline.make_train_dataset(
      examples, image_size=size, global_batch_size=batch_size)
  eval_data = pipeline.make_eval_dataset(
      examples, image_size=size, global_batch_size=batch_size).repeat()
  measured = interleaved({
      'train': pipeline_seconds(train_data, args.pipeline_steps),
      'eval': pipeline_seconds(eval_data, args.pipeline_steps),
  }, args.repeats)
  for name, target in (('train', '>= 20'), ('eval', None)):
    pipeline_rate = rate(args.pipeline_steps * batch_size, measured[name])
    add(f'input pipeline, {name}', pipeline_rate, 'our train step',
        ours_rate, pipeline_rate / ours_rate, target=target)

  # Inference: evaluate and the exported SavedModel against model.predict.
  with tempfile.TemporaryDirectory() as directory:
    export_dir = os.path.join(directory, 'export')
    saved_model.export_saved_model(ours, export_dir, size,
                                   [str(i) for i in range(_NUM_CLASSES)])
    signature = tf.saved_model.load(export_dir).signatures['serving_default']
    uint8_batch = tf.constant(images[:batch_size])
    inference = interleaved({
        'predict': call_seconds(
            lambda x: ours.predict(x, batch_size=batch_size, verbose=0),
            batch[0], args.steps),
        'evaluate': call_seconds(
            lambda x: ours.evaluate(x, batch[1], batch_size=batch_size,
                                    verbose=0),
            batch[0], args.steps),
        'serving': call_seconds(lambda x: signature(images=x), uint8_batch,
                                args.steps),
    }, args.repeats)
  predict_rate = rate(images_per_repeat, inference['predict'])
  add('evaluate, ours', rate(images_per_repeat, inference['evaluate']),
      'model.predict', predict_rate,
      paired_ratio(inference['evaluate'], inference['predict']))
  add('serving, exported SavedModel (uint8 in)',
      rate(images_per_repeat, inference['serving']), 'model.predict',
      predict_rate, paired_ratio(inference['serving'], inference['predict']),
      target='>= 1.0')
  # Last: it changes `ours`' BN statistics.
  format_rows, notes = _format_rows(args, ours, images)

  return _results(args, rows, format_rows, notes)


def _results(args, rows, format_rows=(), notes=()):
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
      'formats': list(format_rows),
      'format_notes': list(notes),
  }


def _format_models(args, model, images, directory):
  """`(name, file path, runtime)` of each format whose extra is installed."""
  module = graph.logits_module(model, args.image_size)
  found, notes = [], []
  for name in ('onnx', 'litert', 'litert_int8'):
    try:
      formats.require(name)
    except errors.MissingDependencyError as error:
      notes.append(f'{name} skipped: {error}')
      continue
    path = os.path.join(directory, name + os.path.splitext(
        formats.FORMATS[name].model_file)[1])
    if name == 'onnx':
      import onnx  # pylint: disable=g-import-not-at-top
      onnx.save(onnx_format.onnx_model(module), path)
    else:
      contents = (litert_format.litert_model(module) if name == 'litert' else
                  litert_format.quantize_int8(module, [
                      image[None] for image in
                      images[:args.representative_images]]))
      with open(path, 'wb') as file:
        file.write(contents)
    found.append((name, path, formats.load(name, path)))
  return found, notes


def _format_rows(args, model, images):
  """One row per export format against the model's SavedModel.

  The random model's BN statistics are first set on the images (precise
  BN), so its logits have a sane scale and its top-1 classes vary.
  """
  weight_bytes = sum(4 * int(np.prod(v.shape)) for v in model.weights)
  batch = images[:args.batch_size]
  precise_bn.reestimate(model, tf.data.Dataset.from_tensor_slices(
      (images.astype(np.float32), np.zeros(len(images)))).batch(
          args.batch_size))
  with tempfile.TemporaryDirectory() as directory:
    found, notes = _format_models(args, model, images, directory)
    if not found:
      return [], notes
    export_dir = os.path.join(directory, 'saved_model')
    saved_model.export_saved_model(model, export_dir, args.image_size,
                                   [str(i) for i in range(_NUM_CLASSES)])
    signature = tf.saved_model.load(export_dir).signatures['serving_default']
    reference = signature(images=tf.constant(batch))['logits'].numpy()
    timers = {'saved_model': call_seconds(
        lambda x: signature(images=x), tf.constant(batch), args.steps)}
    for name, _, runtime in found:
      timers[name] = call_seconds(runtime.logits, batch, args.steps)
    seconds = interleaved(timers, args.repeats)
    images_per_repeat = args.steps * len(batch)
    saved_model_rate = rate(images_per_repeat, seconds['saved_model'])
    rows = []
    for name, path, runtime in found:
      logits = runtime.logits(batch)
      rows.append({
          'format': name,
          'megabytes': os.path.getsize(path) / 1e6,
          'size_vs_float32_weights': os.path.getsize(path) / weight_bytes,
          'images_per_second': rate(images_per_repeat, seconds[name]),
          'saved_model_images_per_second': saved_model_rate,
          'speed_vs_saved_model': paired_ratio(seconds[name],
                                               seconds['saved_model']),
          'max_abs_logit_difference': float(np.abs(logits - reference).max()),
          'max_abs_saved_model_logit': float(np.abs(reference).max()),
          'saved_model_top1_classes': len(set(reference.argmax(-1))),
          'top1_agreement': float(
              (logits.argmax(-1) == reference.argmax(-1)).mean()),
          'images_compared': len(batch),
      })
  return rows, notes


def format_table(results):
  lines = [f'{"what":52} {"images/s":>10}  {"baseline":24} {"images/s":>10} '
           f'{"ratio":>7}  target']
  for row in results['rows']:
    lines.append(
        f'{row["name"]:52} {row["images_per_second"]:10.1f}  '
        f'{row["baseline"]:24} {row["baseline_images_per_second"]:10.1f} '
        f'{row["ratio"]:7.2f}  {row["target"] or ""}')
  if results.get('formats'):
    lines += ['', f'{"format":12} {"MB":>8} {"x f32 w":>8} {"images/s":>10} '
              f'{"vs SavedModel":>13} {"max|Δ logits|":>14} '
              f'{"max|logits|":>11} {"top-1 agree":>11}']
    for row in results['formats']:
      lines.append(
          f'{row["format"]:12} {row["megabytes"]:8.2f} '
          f'{row["size_vs_float32_weights"]:8.3f} '
          f'{row["images_per_second"]:10.1f} '
          f'{row["speed_vs_saved_model"]:13.2f} '
          f'{row["max_abs_logit_difference"]:14.2e} '
          f'{row["max_abs_saved_model_logit"]:11.2f} '
          f'{row["top1_agreement"]:11.3f}')
  lines += results.get('format_notes', [])
  return '\n'.join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--batch_size', type=int, default=128,
                      help='Global batch; 128 is the size the targets refer to.')
  parser.add_argument('--precision', default='float32',
                      choices=['float32', 'mixed_bfloat16', 'mixed_float16'])
  parser.add_argument('--jit_compile', type=lambda text: text == 'true',
                      default=False, help='true: XLA for each step.')
  parser.add_argument('--distribution', default='default',
                      choices=['default', 'one_device', 'mirrored'])
  parser.add_argument('--steps', type=int, default=4,
                      help='Timed steps (or calls) per repeat.')
  parser.add_argument('--pipeline_steps', type=int, default=200,
                      help='Timed input-pipeline batches per repeat.')
  parser.add_argument('--repeats', type=int, default=15,
                      help='Interleaved rounds.')
  parser.add_argument('--num_examples', type=int, default=4096)
  parser.add_argument(
      '--model', default=backbones.DEFAULT_MODEL,
      help='A config.model value, or several comma-separated: then the '
      'train step and the export of each, as ratios to the first.')
  parser.add_argument('--representative_images', type=int, default=100,
                      help='Images that calibrate the litert_int8 row.')
  parser.add_argument('--quick', action='store_true',
                      help='Tiny sizes: checks the script works, not speed.')
  parser.add_argument('--out', default=None, help='Write JSON results here.')
  args = parser.parse_args(argv)
  args.models = args.model.split(',')
  for model in args.models:
    backbones.backbone_spec(model)  # Unknown names fail here, listing them.
  if args.quick:
    args.batch_size, args.steps, args.pipeline_steps = 8, 2, 5
    args.repeats, args.num_examples = 2, 64
    args.representative_images = 4
  return args


def main(argv=None):
  args = parse_args(argv)
  results = run(args)
  print(format_table(results))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as file:
      json.dump(results, file, indent=2)
  return results


if __name__ == '__main__':
  main()
