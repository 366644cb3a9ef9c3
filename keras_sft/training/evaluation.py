"""The evaluation report: numbers and pictures a person can look at.

`write_report(model, eval_data, class_names, workdir)` runs the model over the
eval dataset once and writes, into the workdir:

  confusion_matrix.png   rows: true class, columns: predicted class; cells
                         show counts, colored by the fraction of the row
  curves.png             loss, accuracy and learning rate per epoch, from
                         `<workdir>/history.csv` (when training wrote it)
  reliability.png        reliability diagram: accuracy against confidence
                         in 15 equal-width bins, before and (with a fitted
                         temperature) after temperature scaling
  tensorboard/report/    the confusion matrix as a TensorBoard image

and returns the numbers (top-1, top-5, per-class accuracy, precision, recall
and F1, macro-F1, balanced accuracy, the confusion matrix, the expected
calibration error before and after temperature scaling) for `metrics.json`.
"""

import csv
import io
import logging
import os

import matplotlib

matplotlib.use('Agg')  # No display: render to files only.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib import ticker  # pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf

from keras_sft import files
from keras_sft.training import calibration
from keras_sft import workdir as workdir_lib

# Above this many classes, the confusion matrix PNG has no numbers in cells.
_MAX_ANNOTATED_CLASSES = 20
# Above this many classes, it has no class names on the axes either.
_MAX_LABELLED_CLASSES = 50


def predict(model, eval_data, steps=None):
  """Returns `(labels, logits)` numpy arrays over `eval_data`.

  Args:
    model: A Keras model mapping image batches to logits.
    eval_data: A finite dataset of `(images, labels)` batches.
    steps: Batches to use; None for all.
  """
  if steps is not None:
    eval_data = eval_data.take(steps)
  # A plain call, not `predict_on_batch`: under MultiWorkerMirroredStrategy
  # only the chief writes the report, and `predict` would wait for the
  # other workers in a collective.
  forward = tf.function(lambda images: model(images, training=False))
  labels, logits = [], []
  for images, batch_labels in eval_data:
    logits.append(np.asarray(forward(images)))
    labels.append(np.asarray(batch_labels))
  if not labels:
    raise ValueError('The eval dataset yielded no batches.')
  return np.concatenate(labels).astype(np.int64), np.concatenate(logits)


def confusion_matrix(labels, predictions, num_classes):
  """`[num_classes, num_classes]` counts: row = true, column = predicted."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (labels, predictions), 1)
  return matrix


def _ratio(numerators, denominators):
  """numerators / denominators, 0 where the denominator is 0."""
  numerators = np.asarray(numerators, np.float64)
  denominators = np.asarray(denominators, np.float64)
  return np.divide(numerators, denominators,
                   out=np.zeros_like(numerators), where=denominators > 0)


def class_scores(matrix):
  """Per-class precision, recall and F1, macro-F1 and balanced accuracy.

  From the confusion matrix (row = true, column = predicted). A ratio whose
  denominator is 0 is 0, as scikit-learn's `zero_division=0`: precision of
  a class never predicted, recall of a class without examples, F1 when
  precision + recall = 0. Macro-F1 averages F1 over the classes that occur
  among the labels or the predictions (scikit-learn's default `labels`);
  balanced accuracy averages recall over the classes with examples
  (scikit-learn's `balanced_accuracy_score`).

  Returns:
    `(precision, recall, f1, macro_f1, balanced_accuracy)`: three float64
    `[num_classes]` arrays and two floats.
  """
  matrix = np.asarray(matrix, np.int64)
  hits = np.diag(matrix)
  true = matrix.sum(axis=1)
  predicted = matrix.sum(axis=0)
  precision = _ratio(hits, predicted)
  recall = _ratio(hits, true)
  f1 = _ratio(2 * precision * recall, precision + recall)
  occurring = (true > 0) | (predicted > 0)
  macro_f1 = float(f1[occurring].mean()) if occurring.any() else 0.0
  balanced_accuracy = (float(recall[true > 0].mean()) if (true > 0).any()
                       else 0.0)
  return precision, recall, f1, macro_f1, balanced_accuracy


def compute_report(labels, logits, class_names):
  """Top-1, top-5, per-class accuracy and the confusion matrix.

  Args:
    labels: `[N]` int class ids.
    logits: `[N, num_classes]` scores.
    class_names: One name per class id.

  Returns:
    A JSON-serializable dict. Top-5 counts a hit when the label is among
    the `min(5, num_classes)` highest scores; a class without eval examples
    has accuracy None. Precision, recall, F1, macro-F1 and balanced
    accuracy are those of `class_scores` (0/0 is 0 there).
  """
  labels = np.asarray(labels)
  logits = np.asarray(logits)
  num_classes = len(class_names)
  if logits.ndim != 2 or logits.shape[1] != num_classes:
    raise ValueError(f'Expected logits of shape [N, {num_classes}]. '
                     f'Received: {logits.shape}')
  predictions = np.argmax(logits, axis=1)
  k = min(5, num_classes)
  top_k = np.argsort(-logits, axis=1, kind='stable')[:, :k]
  matrix = confusion_matrix(labels, predictions, num_classes)
  counts = matrix.sum(axis=1)
  per_class = {
      name: (float(matrix[i, i] / counts[i]) if counts[i] else None)
      for i, name in enumerate(class_names)
  }
  precision, recall, f1, macro_f1, balanced_accuracy = class_scores(matrix)

  def by_name(values):
    return {name: float(values[i]) for i, name in enumerate(class_names)}

  return {
      'num_examples': int(len(labels)),
      'top1': float(np.mean(predictions == labels)),
      'top5': float(np.mean(np.any(top_k == labels[:, None], axis=1))),
      'per_class_accuracy': per_class,
      'per_class_count': {name: int(counts[i])
                          for i, name in enumerate(class_names)},
      'per_class_precision': by_name(precision),
      'per_class_recall': by_name(recall),
      'per_class_f1': by_name(f1),
      'macro_f1': macro_f1,
      'balanced_accuracy': balanced_accuracy,
      'class_names': list(class_names),
      'confusion_matrix': matrix.tolist(),
  }


def calibration_report(labels, logits, temperature=None):
  """ECE and NLL of softmax(logits), and of softmax(logits / T) if given.

  Args:
    labels: `[N]` int class ids.
    logits: `[N, num_classes]` logits.
    temperature: None (no calibration), or the T fitted on the
      calibration split (`keras_sft.training.calibration`).

  Returns:
    A JSON-serializable dict: `ece_bins`, `ece`, `nll`, and with a
    temperature also `temperature`, `ece_calibrated` and `nll_calibrated`.
  """
  report = {
      'ece_bins': calibration.ECE_BINS,
      'ece': calibration.expected_calibration_error(
          calibration.softmax(logits), labels),
      'nll': calibration.negative_log_likelihood(logits, labels),
  }
  if temperature is not None:
    report.update(
        temperature=float(temperature),
        ece_calibrated=calibration.expected_calibration_error(
            calibration.softmax(logits, temperature), labels),
        nll_calibrated=calibration.negative_log_likelihood(
            logits, labels, temperature))
  return report


def plot_reliability(labels, logits, temperature=None):
  """The reliability diagram, one panel per T (1, and the fitted one).

  Bars: accuracy of each equal-width confidence bin; the diagonal is
  perfect calibration; the count of each bin is written above its bar.
  Returns PNG bytes.
  """
  temperatures = [1.0] + ([temperature] if temperature is not None else [])
  figure, all_axes = plt.subplots(1, len(temperatures),
                                  figsize=(5.2 * len(temperatures), 5),
                                  squeeze=False)
  bins = calibration.ECE_BINS
  edges = np.linspace(0, 1, bins + 1)
  for axes, value in zip(all_axes[0], temperatures):
    probabilities = calibration.softmax(logits, value)
    counts, accuracy, confidence = calibration.reliability_bins(
        probabilities, labels, bins)
    ece = calibration.expected_calibration_error(probabilities, labels, bins)
    used = counts > 0
    axes.bar(edges[:-1][used], accuracy[used], width=1 / bins,
             align='edge', edgecolor='black', alpha=0.7, label='accuracy')
    axes.plot(confidence[used], accuracy[used], 'o', color='darkred',
              label='(mean confidence, accuracy)')
    axes.plot([0, 1], [0, 1], 'k--', label='perfect calibration')
    for left, count, height in zip(edges[:-1][used], counts[used],
                                   accuracy[used]):
      axes.text(left + 0.5 / bins, min(height, 0.93) + 0.02, str(count),
                ha='center', fontsize=7)
    title = ('before temperature scaling (T = 1)' if value == 1.0 and
             temperature is not None else f'T = {value:.3g}')
    axes.set_title(f'{title}\nECE {ece:.4f} ({bins} bins, '
                   f'{len(labels)} images)')
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel('confidence (top probability)')
    axes.set_ylabel('accuracy')
    axes.legend(loc='upper left', fontsize=8)
  figure.tight_layout()
  return _png_bytes(figure)


def plot_confusion_matrix(matrix, class_names, title='Confusion matrix'):
  """Renders the confusion matrix; returns PNG bytes."""
  matrix = np.asarray(matrix)
  num_classes = len(class_names)
  rows = matrix.sum(axis=1, keepdims=True)
  fractions = np.divide(matrix, rows, out=np.zeros(matrix.shape, float),
                        where=rows > 0)
  side = float(np.clip(2.5 + 0.45 * num_classes, 5, 20))
  figure, axes = plt.subplots(figsize=(side + 1.5, side))
  shown = axes.imshow(fractions, cmap='Blues', vmin=0, vmax=1)
  figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04,
                  label='fraction of the true class')
  if num_classes <= _MAX_LABELLED_CLASSES:
    ticks = np.arange(num_classes)
    # parse_math=False: class names are shown as written; a folder named
    # `$\foo$` is not TeX (matplotlib's mathtext would fail on it).
    axes.set_xticks(ticks, labels=class_names, rotation=90, parse_math=False)
    axes.set_yticks(ticks, labels=class_names, parse_math=False)
  if num_classes <= _MAX_ANNOTATED_CLASSES:
    for i in range(num_classes):
      for j in range(num_classes):
        axes.text(j, i, str(matrix[i, j]), ha='center', va='center',
                  color='white' if fractions[i, j] > 0.5 else 'black',
                  fontsize=9)
  axes.set_xlabel('predicted class')
  axes.set_ylabel('true class')
  axes.set_title(f'{title} ({int(matrix.sum())} images, top-1 '
                 f'{np.trace(matrix) / max(matrix.sum(), 1):.1%})')
  figure.tight_layout()
  return _png_bytes(figure)


def _png_bytes(figure):
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=100)
  plt.close(figure)
  return buffer.getvalue()


def read_history(path):
  """Reads Keras' CSVLogger file into `{column: [float per epoch]}`.

  Columns that are not numbers are left out. A resumed run appends rows;
  when an epoch appears twice, the later row wins.
  """
  with open(path, newline='') as file:
    rows = list(csv.DictReader(file))
  by_epoch = {}
  for row in rows:
    try:
      by_epoch[int(float(row['epoch']))] = row
    except (KeyError, ValueError):
      continue
  history = {'epoch': []}
  for epoch in sorted(by_epoch):
    history['epoch'].append(epoch + 1)  # CSVLogger counts from 0.
  for column in (rows[0].keys() if rows else ()):
    if column == 'epoch':
      continue
    values = []
    for epoch in sorted(by_epoch):
      try:
        values.append(float(by_epoch[epoch][column]))
      except (TypeError, ValueError):
        values.append(float('nan'))
    history[column] = values
  return history


def plot_curves(history):
  """Loss, accuracy and learning rate per epoch; returns PNG bytes.

  Args:
    history: `{column: values}` as from `read_history`; `val_*` columns are
      drawn next to their training column.
  """
  epochs = history['epoch']
  panels = [('loss', 'loss'), ('accuracy', 'top-1 accuracy'),
            ('learning_rate', 'learning rate')]
  figure, all_axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
  for axes, (key, title) in zip(all_axes, panels):
    drawn = False
    train_label = 'at epoch end' if key == 'learning_rate' else 'train'
    for column, label, style in ((key, train_label, 'o-'),
                                 (f'val_{key}', 'eval', 's--')):
      values = history.get(column)
      if values and not np.all(np.isnan(values)):
        axes.plot(epochs, values, style, label=label)
        drawn = True
    if key == 'accuracy' and history.get('top5'):
      axes.plot(epochs, history['top5'], '^:', label='train top-5')
    axes.set_title(title)
    axes.set_xlabel('epoch')
    axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if drawn:
      axes.legend()
    else:
      axes.text(0.5, 0.5, f'no {key} in history.csv', ha='center',
                transform=axes.transAxes)
  figure.tight_layout()
  return _png_bytes(figure)


def write_report(model, eval_data, class_names, workdir, steps=None,
                 step=0, temperature=None):
  """Evaluates `model` and writes the report files into `workdir`.

  Args:
    model: A Keras model mapping image batches to logits.
    eval_data: A finite dataset of `(images, labels)` batches.
    class_names: One name per class id.
    workdir: Directory of the run; `history.csv` there is plotted if present.
    steps: Eval batches to use; None for all.
    step: Optimizer step, the TensorBoard step of the confusion matrix.
    temperature: None, or the T fitted on the calibration split: the
      report's `calibration` then holds the ECE after scaling too.

  Returns:
    The report dict of `compute_report`, with `calibration` (of
    `calibration_report`).
  """
  run = workdir_lib.Workdir(workdir)
  labels, logits = predict(model, eval_data, steps)
  report = compute_report(labels, logits, class_names)
  report['calibration'] = calibration_report(labels, logits, temperature)
  files.atomic_write(run.reliability_png,
                     plot_reliability(labels, logits, temperature))
  png = plot_confusion_matrix(report['confusion_matrix'], class_names,
                              title=f'Confusion matrix at step {step}')
  files.atomic_write(run.confusion_matrix_png, png)
  writer = tf.summary.create_file_writer(
      os.path.join(run.tensorboard, 'report'))
  with writer.as_default():
    image = tf.image.decode_png(png, channels=4)[tf.newaxis]
    tf.summary.image('confusion_matrix', image, step=step)
  writer.close()
  if os.path.exists(run.history_csv):
    history = read_history(run.history_csv)
    if history['epoch']:
      files.atomic_write(run.curves_png, plot_curves(history))
  else:
    logging.info('No %s: no curves plotted.', run.history_csv)
  logging.info('Report: top-1 %.4f, top-5 %.4f, macro-F1 %.4f, balanced '
               'accuracy %.4f on %d images; per class: %s', report['top1'],
               report['top5'], report['macro_f1'],
               report['balanced_accuracy'], report['num_examples'],
               report['per_class_accuracy'])
  if temperature is None:
    logging.info('ECE %.4f (%d bins) on the eval split.',
                 report['calibration']['ece'], calibration.ECE_BINS)
  else:
    logging.info('ECE %.4f -> %.4f (%d bins) on the eval split with T=%.4f.',
                 report['calibration']['ece'],
                 report['calibration']['ece_calibrated'],
                 calibration.ECE_BINS, temperature)
  return report
