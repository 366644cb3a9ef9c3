"""Tests of the evaluation report: numbers, PNGs, TensorBoard, evaluate mode."""

import csv
import glob
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import cifar10_resnet50
from keras_sft.training import evaluation
from keras_sft.training import train
from keras_sft import workdir as workdir_lib

_CLASSES = ('a', 'b', 'c', 'd', 'e', 'f', 'g')


def test_compute_report_matches_hand_counts():
  # 7 classes, so that top-5 differs from "always right".
  labels = np.array([0, 0, 1, 2, 6, 6])
  logits = np.zeros((6, 7), np.float32)
  # Scores rank the classes 0 > 1 > ... > 6 unless set otherwise.
  logits[:] = np.arange(7, 0, -1)
  logits[1, 3] = 10  # label 0 predicted 3; 0 is second: a top-5 hit.
  logits[2, 1] = 10  # label 1 predicted 1: right.
  logits[3, 2] = 10  # label 2 predicted 2: right.
  logits[4, 6] = 10  # label 6 predicted 6: right.
  # Row 0: label 0 predicted 0; row 5: label 6 predicted 0 and ranked last:
  # a top-5 miss.
  report = evaluation.compute_report(labels, logits, _CLASSES)
  assert report['num_examples'] == 6
  assert report['top1'] == pytest.approx(4 / 6)
  assert report['top5'] == pytest.approx(5 / 6)
  expected = np.zeros((7, 7), int)
  for true, predicted in ((0, 0), (0, 3), (1, 1), (2, 2), (6, 6), (6, 0)):
    expected[true, predicted] += 1
  np.testing.assert_array_equal(report['confusion_matrix'], expected)
  assert report['per_class_accuracy'] == {
      'a': 0.5, 'b': 1.0, 'c': 1.0, 'd': None, 'e': None, 'f': None,
      'g': 0.5}
  assert report['per_class_count']['a'] == 2


def _from_matrix(matrix):
  """Labels and one-hot logits whose confusion matrix is `matrix`."""
  labels, predictions = [], []
  for true, row in enumerate(matrix):
    for predicted, count in enumerate(row):
      labels += [true] * count
      predictions += [predicted] * count
  return np.array(labels), np.eye(len(matrix))[predictions]


def test_class_scores_match_hand_computation_with_a_class_never_predicted():
  matrix = [[3, 1, 0, 0],
            [1, 2, 0, 0],
            [0, 1, 1, 0],
            [1, 0, 1, 0]]  # Class 3 has 2 examples and is never predicted.
  report = evaluation.compute_report(*_from_matrix(matrix), 'wxyz')
  np.testing.assert_array_equal(report['confusion_matrix'], matrix)
  # Precision: diagonal / column sums 5, 4, 2, 0 (0/0 is 0).
  assert report['per_class_precision'] == pytest.approx(
      {'w': 3 / 5, 'x': 2 / 4, 'y': 1 / 2, 'z': 0.0})
  # Recall: diagonal / row sums 4, 3, 2, 2.
  assert report['per_class_recall'] == pytest.approx(
      {'w': 3 / 4, 'x': 2 / 3, 'y': 1 / 2, 'z': 0.0})
  # F1 = 2PR / (P + R): 0.9 / 1.35, (2/3) / (7/6), 0.5, 0 (0/0).
  assert report['per_class_f1'] == pytest.approx(
      {'w': 2 / 3, 'x': 4 / 7, 'y': 1 / 2, 'z': 0.0})
  assert report['macro_f1'] == pytest.approx((2 / 3 + 4 / 7 + 1 / 2) / 4)
  assert report['balanced_accuracy'] == pytest.approx(
      (3 / 4 + 2 / 3 + 1 / 2 + 0) / 4)


@pytest.mark.parametrize('case', ['never_predicted', 'never_true'])
def test_class_scores_agree_with_scikit_learn(case):
  metrics = pytest.importorskip('sklearn.metrics')
  if case == 'never_predicted':
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3])
    predictions = np.array([0, 1, 0, 1, 0, 2, 0, 0, 2])
  else:  # Class 3 predicted once but absent from the labels; 4 in neither.
    labels = np.array([0, 0, 1, 2, 2, 2])
    predictions = np.array([0, 3, 1, 2, 0, 2])
  matrix = evaluation.confusion_matrix(labels, predictions, 5)
  precision, recall, f1, macro_f1, balanced = evaluation.class_scores(matrix)
  ids = list(range(5))
  np.testing.assert_allclose(precision, metrics.precision_score(
      labels, predictions, labels=ids, average=None, zero_division=0))
  np.testing.assert_allclose(recall, metrics.recall_score(
      labels, predictions, labels=ids, average=None, zero_division=0))
  np.testing.assert_allclose(f1, metrics.f1_score(
      labels, predictions, labels=ids, average=None, zero_division=0))
  assert macro_f1 == pytest.approx(metrics.f1_score(
      labels, predictions, average='macro', zero_division=0))
  with warnings.catch_warnings():  # "y_pred contains classes not in y_true"
    warnings.simplefilter('ignore')
    assert balanced == pytest.approx(metrics.balanced_accuracy_score(
        labels, predictions))


def test_compute_report_rejects_wrong_logit_width():
  with pytest.raises(ValueError, match=r'\[N, 7\]'):
    evaluation.compute_report(np.zeros(2, int), np.zeros((2, 3)), _CLASSES)


def _write_history(path):
  """A CSVLogger-like file of a run resumed during epoch 2 (row repeated)."""
  columns = ['epoch', 'accuracy', 'learning_rate', 'loss', 'top5',
             'val_accuracy', 'val_loss']
  rows = [[0, 0.2, 0.01, 2.0, 0.6, 0.25, 1.9],
          [1, 0.3, 0.02, 1.8, 0.7, 0.30, 1.7],
          [1, 0.35, 0.02, 1.7, 0.7, 0.33, 1.6],
          [2, 0.5, 0.005, 1.2, 0.9, 0.45, 1.3]]
  with open(path, 'w', newline='') as file:
    writer = csv.writer(file)
    writer.writerow(columns)
    writer.writerows(rows)


def test_read_history_keeps_the_last_row_of_each_epoch(tmp_path):
  path = str(tmp_path / 'history.csv')
  _write_history(path)
  history = evaluation.read_history(path)
  assert history['epoch'] == [1, 2, 3]
  assert history['loss'] == [2.0, 1.7, 1.2]
  assert history['learning_rate'] == [0.01, 0.02, 0.005]


def _tiny_model(num_classes):
  keras.utils.set_random_seed(1)
  return keras.Sequential([
      keras.Input((8, 8, 3)),
      keras.layers.GlobalAveragePooling2D(),
      keras.layers.Dense(num_classes),
  ])


def _png_size(path):
  image = tf.io.decode_png(tf.io.read_file(path))
  return tuple(image.shape)


@pytest.mark.parametrize('steps, expected_count', [(None, 11), (2, 8)])
def test_write_report_files_and_confusion_matrix_sum(tmp_path, steps,
                                                     expected_count):
  workdir = str(tmp_path)
  _write_history(workdir_lib.Workdir(workdir).history_csv)
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255, (11, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 7, 11).astype(np.int64)
  # Batches of 4: the last one holds 3 images and must count too.
  data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
  model = _tiny_model(7)

  report = evaluation.write_report(model, data, _CLASSES, workdir,
                                   steps=steps, step=5)

  matrix = np.array(report['confusion_matrix'])
  assert matrix.sum() == report['num_examples'] == expected_count
  predicted = np.argmax(model(images[:expected_count]), axis=1)
  assert report['top1'] == pytest.approx(
      np.mean(predicted == labels[:expected_count]))
  for name in ("confusion_matrix.png", "curves.png"):
    height, width, _ = _png_size(os.path.join(workdir, name))
    assert height >= 300 and width >= 400, name
  events = glob.glob(os.path.join(
      workdir_lib.Workdir(workdir).tensorboard, 'report',
                                  'events.out.tfevents.*'))
  assert len(events) == 1
  tags = [(value.tag, event.step)
          for event in tf.compat.v1.train.summary_iterator(events[0])
          for value in event.summary.value]
  assert ('confusion_matrix', 5) in tags


def test_write_report_without_history_skips_the_curves(tmp_path):
  data = tf.data.Dataset.from_tensor_slices(
      (np.zeros((3, 8, 8, 3), np.float32), np.array([0, 1, 2]))).batch(2)
  evaluation.write_report(_tiny_model(3), data, ('x', 'y', 'z'),
                          str(tmp_path))
  assert os.path.exists(tmp_path / "confusion_matrix.png")
  assert not os.path.exists(tmp_path / "curves.png")


def test_evaluate_mode_needs_a_trained_run(tmp_path):
  config = cifar10_resnet50.get_config('smoke')
  with pytest.raises(FileNotFoundError,
                     match='holds no keras_sft run.*Train first'):
    train.evaluate(config, str(tmp_path / 'never_trained'))
  assert not os.path.exists(tmp_path / 'never_trained')
  (tmp_path / 'claimed').mkdir()
  (tmp_path / 'claimed' / 'config.json').write_text('{}')
  with pytest.raises(FileNotFoundError, match='holds no backup'):
    train.evaluate(config, str(tmp_path / 'claimed'))


def test_class_names_with_dollar_signs_are_drawn_verbatim(tmp_path,
                                                          monkeypatch):
  """No matplotlib mathtext: `$\\foo$` is a folder name, not TeX."""
  names = ('$\\foo$', 'price $5', '$x^2$')
  data = tf.data.Dataset.from_tensor_slices(
      (np.zeros((3, 8, 8, 3), np.float32), np.array([0, 1, 2]))).batch(2)
  report = evaluation.write_report(_tiny_model(3), data, names, str(tmp_path))
  assert report['class_names'] == list(names)
  assert _png_size(workdir_lib.Workdir(tmp_path).confusion_matrix_png)[0] >= 300
  drawn = []
  real_savefig = evaluation.plt.Figure.savefig

  def record(figure, *args, **kwargs):
    drawn.extend(text for text in figure.findobj(evaluation.plt.Text)
                 if text.get_text() in names)
    return real_savefig(figure, *args, **kwargs)

  monkeypatch.setattr(evaluation.plt.Figure, 'savefig', record)
  evaluation.plot_confusion_matrix(report['confusion_matrix'], names)
  # Every name is drawn (on both axes), each as plain text.
  assert sorted({text.get_text() for text in drawn}) == sorted(names)
  assert not [text for text in drawn if text.get_parse_math()]
