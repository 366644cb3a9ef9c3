"""Temperature scaling: the fit, the ECE, the config checks, the record."""

import json
import math

import numpy as np
import pytest

from keras_sft import default_config
from keras_sft import errors
from keras_sft.training import calibration
from keras_sft.training import evaluation


def _calibrated_sample(rng, count, num_classes=10, scale=1.5):
  """Logits and labels drawn from softmax(logits): calibrated by design."""
  logits = rng.normal(0, scale, (count, num_classes))
  probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  cumulative = probabilities.cumsum(-1)
  labels = (rng.random((count, 1)) > cumulative).sum(-1)
  return logits, np.minimum(labels, num_classes - 1)


def test_temperature_of_five_times_calibrated_logits_is_five():
  rng = np.random.default_rng(0)
  logits, labels = _calibrated_sample(rng, 20_000)
  over_confident = 5 * logits
  temperature = calibration.fit_temperature(over_confident, labels)
  assert temperature == pytest.approx(5, rel=0.05)
  # On a fresh sample of the same model (a test split): ECE drops, accuracy
  # is unchanged (one positive T ranks the classes as before).
  test_logits, test_labels = _calibrated_sample(rng, 20_000)
  before = calibration.expected_calibration_error(
      calibration.softmax(5 * test_logits), test_labels)
  after = calibration.expected_calibration_error(
      calibration.softmax(5 * test_logits, temperature), test_labels)
  assert before > 0.2
  assert after < 0.02
  assert after < before / 10
  np.testing.assert_array_equal(
      calibration.softmax(5 * test_logits).argmax(-1),
      calibration.softmax(5 * test_logits, temperature).argmax(-1))


def test_the_fitted_temperature_minimizes_the_nll_on_a_grid():
  rng = np.random.default_rng(1)
  logits, labels = _calibrated_sample(rng, 2_000, num_classes=4)
  logits = 0.4 * logits  # Under-confident: T < 1.
  temperature = calibration.fit_temperature(logits, labels)
  assert temperature < 1
  grid = np.exp(np.linspace(math.log(0.05), math.log(20), 4001))
  values = [calibration.negative_log_likelihood(logits, labels, value)
            for value in grid]
  best = grid[int(np.argmin(values))]
  # The grid's spacing in log T is 0.0015.
  assert abs(math.log(temperature) - math.log(best)) < 2e-3
  assert calibration.negative_log_likelihood(
      logits, labels, temperature) <= min(values) + 1e-9


def test_negative_log_likelihood_by_hand():
  logits = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
  labels = np.array([0, 2])
  temperature = 2.0
  expected = 0.0
  for row, label in zip(logits, labels):
    scaled = row / temperature
    expected -= math.log(math.exp(scaled[label]) / sum(
        math.exp(value) for value in scaled))
  assert calibration.negative_log_likelihood(
      logits, labels, temperature) == pytest.approx(expected / 2, rel=1e-12)


def test_ece_against_a_hand_computation():
  # Top probabilities 0.9, 0.95 (bin (14/15, 1]), 0.5, 0.55 (bin (7/15,
  # 8/15] and (8/15, 9/15]: 0.5 is in bin 8, 0.55 in bin 9), 0.4 (bin 6).
  probabilities = np.array([
      [0.9, 0.05, 0.05],   # bin 14 (0.8667, 0.9333]: right
      [0.95, 0.03, 0.02],  # bin 15: wrong
      [0.5, 0.3, 0.2],     # bin 8 (0.4667, 0.5333]: right
      [0.55, 0.25, 0.2],   # bin 9 (0.5333, 0.6]: wrong
      [0.4, 0.35, 0.25],   # bin 6 (0.3333, 0.4]: right
      [0.93, 0.04, 0.03],  # bin 14: right
  ])
  labels = np.array([0, 1, 0, 2, 0, 0])
  # Bins by hand: (count, accuracy, mean confidence).
  bins = [(2, 1.0, (0.9 + 0.93) / 2), (1, 0.0, 0.95), (1, 1.0, 0.5),
          (1, 0.0, 0.55), (1, 1.0, 0.4)]
  expected = sum(count / 6 * abs(accuracy - confidence)
                 for count, accuracy, confidence in bins)
  assert calibration.expected_calibration_error(
      probabilities, labels) == pytest.approx(expected, abs=1e-12)
  counts, accuracy, confidence = calibration.reliability_bins(
      probabilities, labels)
  assert counts.tolist() == [0, 0, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 2, 1]
  assert confidence[13] == pytest.approx(0.915)
  assert accuracy[14] == 0.0
  assert np.isnan(accuracy[0])


def test_a_confidence_on_a_bin_edge_goes_to_the_lower_bin():
  # (m-1)/M < confidence <= m/M: 0.6 = 9/15 is in bin 9, not 10.
  probabilities = np.array([[0.6, 0.4]])
  counts, _, _ = calibration.reliability_bins(probabilities, np.array([0]))
  assert np.flatnonzero(counts).tolist() == [8]
  # One example, right, confidence 0.6: ECE = |1 - 0.6|.
  assert calibration.expected_calibration_error(
      probabilities, np.array([0])) == pytest.approx(0.4)


def test_fit_refuses_empty_or_non_finite_logits():
  with pytest.raises(errors.DataError, match='N > 0'):
    calibration.fit_temperature(np.zeros((0, 3)), np.zeros(0, int))
  with pytest.raises(errors.DataError, match='not finite'):
    calibration.fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))


def test_a_split_that_cannot_pin_t_down_is_at_a_bound_and_logged(caplog):
  # Every example right: the NLL falls as T -> 0.
  logits = np.array([[3.0, 0.0], [0.0, 2.0]])
  temperature = calibration.fit_temperature(logits, np.array([0, 1]))
  assert temperature == pytest.approx(calibration.MIN_TEMPERATURE, rel=1e-3)
  assert 'at a bound' in caplog.text


def _config(**values):
  config = default_config.get_config()
  for key, value in values.items():
    config[key] = value
  return config


@pytest.mark.parametrize('values', [
    dict(calibration_split='val'),
    dict(train_split='train[:90%]', calibration_split='train[90%:]'),
    dict(train_split='train[:80%]', eval_split='train[80%:90%]',
         calibration_split='train[90%:]'),
    dict(train_split='train[:-10%]', calibration_split='train[-10%:]'),
    dict(train_split='train[:900]', calibration_split='train[900:]'),
    dict(calibration_split=None),
])
def test_disjoint_calibration_splits_are_accepted(values):
  calibration.check_config(_config(**values))


@pytest.mark.parametrize('values, named', [
    (dict(calibration_split='test'), 'eval_split'),
    (dict(calibration_split='train[90%:]'), 'train_split'),
    (dict(train_split='train[:91%]', calibration_split='train[90%:]'),
     'train_split'),
    (dict(train_split='train[:900]', calibration_split='train[90%:]'),
     'train_split'),
    (dict(train_split='train[:90%]', calibration_split='train[-100:]'),
     'train_split'),
    (dict(calibration_split='test+train'), None),
    # Bounds that are no numbers: a ValueError traceback before.
    (dict(calibration_split='val[:1.2.3]'), None),
    (dict(calibration_split='val[..%:]'), None),
    (dict(calibration_split=''), None),
])
def test_overlapping_or_unclear_calibration_splits_are_refused(values,
                                                               named):
  with pytest.raises(errors.ConfigError) as raised:
    calibration.check_config(_config(**values))
  message = str(raised.value)
  assert repr(values['calibration_split']) in message
  assert 'calibration_split=val' in message  # The fix.
  if named:
    assert named in message


def test_with_a_validation_fraction_only_the_train_split_is_compared():
  # The eval part is carved from train_split; eval_split is unused.
  calibration.check_config(_config(dataset='folder:/x', calibration_split='test',
                                    validation_fraction=0.1))
  with pytest.raises(errors.ConfigError, match='train_split'):
    calibration.check_config(_config(dataset='folder:/x',
                                     calibration_split='train',
                                     validation_fraction=0.1))


def test_the_record_is_served_only_with_the_weights_it_was_fitted_for(
    tmp_path):
  rng = np.random.default_rng(2)
  logits, labels = _calibrated_sample(rng, 500, num_classes=3)
  record = calibration.fit_record(3 * logits, labels, 'val', step=40,
                                  weights='raw')
  assert record['nll_calibrated'] < record['nll']
  assert record['ece_calibrated'] < record['ece']
  assert record['num_examples'] == 500
  workdir = str(tmp_path)
  assert calibration.temperature_for_export(workdir, 'final.weights.h5',
                                            40) == (1.0, None)
  calibration.write_record(workdir, record)
  with open(calibration.record_path(workdir)) as file:
    assert json.load(file)['temperature'] == record['temperature']
  assert calibration.temperature_for_export(
      workdir, '/a/final.weights.h5', 40) == (record['temperature'], record)
  assert calibration.temperature_for_export(
      workdir, 'best.weights.h5', 40) == (1.0, None)
  assert calibration.temperature_for_export(
      workdir, 'ckpt-41.weights.h5', 41) == (1.0, None)
  calibration.remove_record(workdir)
  assert calibration.temperature_for_export(
      workdir, 'final.weights.h5', 40) == (1.0, None)


@pytest.mark.parametrize('text', [
    '{"temperature": 0, "step": 40}',
    '{"temperature": NaN, "step": 40}',
    '{"temperature": Infinity, "step": 40}',
    '{"temperature": -2.0, "step": 40}',
    # float32(1e-300) is 0: the export would divide the logits by 0.
    '{"temperature": 1e-300, "step": 40}',
    '{"temperature": 1e30, "step": 40}',
    '{"temperature": "2.0", "step": 40}',
    '{"temperature": true, "step": 40}',
    '{"step": 40}',
    '{"temperature": 2.0, "step": "40"}',
    '[2.0, 40]',
    '{"temperature": 2.0, "st',
])
def test_a_damaged_or_edited_record_is_one_error_naming_the_file(tmp_path,
                                                                 text):
  workdir = str(tmp_path)
  with open(calibration.record_path(workdir), 'w') as file:
    file.write(text)
  with pytest.raises(errors.DataError,
                     match='calibration.json') as raised:
    calibration.temperature_for_export(workdir, 'final.weights.h5', 40)
  assert 'Delete it' in str(raised.value) or 'delete it' in str(raised.value)


def test_a_record_at_the_search_bounds_is_served(tmp_path):
  workdir = str(tmp_path)
  for temperature in (calibration.MIN_TEMPERATURE,
                      calibration.MAX_TEMPERATURE):
    calibration.write_record(workdir, {'temperature': temperature,
                                       'step': 40})
    assert calibration.temperature_for_export(
        workdir, 'final.weights.h5', 40)[0] == temperature


def test_the_report_gives_ece_before_and_after_and_draws_both(tmp_path):
  rng = np.random.default_rng(3)
  logits, labels = _calibrated_sample(rng, 3_000, num_classes=5)
  report = evaluation.calibration_report(labels, 4 * logits, temperature=4.0)
  assert report['ece_bins'] == 15
  assert report['ece'] == pytest.approx(calibration.expected_calibration_error(
      calibration.softmax(4 * logits), labels))
  assert report['ece_calibrated'] == pytest.approx(
      calibration.expected_calibration_error(calibration.softmax(logits),
                                             labels))
  assert report['ece_calibrated'] < report['ece']
  assert report['nll_calibrated'] < report['nll']
  assert 'temperature' not in evaluation.calibration_report(labels, logits)
  png = evaluation.plot_reliability(labels, 4 * logits, 4.0)
  assert png.startswith(b'\x89PNG')
