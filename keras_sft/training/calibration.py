"""Temperature scaling (Guo et al. 2017): calibrated probabilities.

After training, one temperature T > 0 is fitted on a held-out calibration
split (`config.calibration_split`, never the eval split): the T minimizing
the mean negative log-likelihood of softmax(logits / T). Dividing every
logit by one positive T changes no class ranking, so accuracy and top-k
classes stay as they were; only the probabilities change.

The fit collects the logits once (numpy, float64) and runs a golden-section
search over u = log T in [log `MIN_TEMPERATURE`, log `MAX_TEMPERATURE`]: the
NLL is convex in 1/T (a log-sum-exp of linear functions of 1/T minus a
linear one), so it is unimodal in log T and golden-section finds its
minimum; no learning rate, no iterations to tune.

`expected_calibration_error` is the standard ECE: 15 equal-width bins of
the confidence (the top probability), (m-1)/M < confidence <= m/M, and
ECE = sum over bins of (n_m / N) |accuracy_m - mean confidence_m|.

The fitted T is written to `<workdir>/calibration.json` with the step and
the weights it was fitted for; every export of those weights serves it
(`temperature_for_export`), in the SavedModel's and converted formats'
`probabilities`, and in their metadata.
"""

import logging
import math
import os

import numpy as np

from keras_sft import errors
from keras_sft import files
from keras_sft.data import folders
from keras_sft.training import checkpoints
from keras_sft import workdir as workdir_lib

# Search bounds of T. An optimum at a bound (logged) means the calibration
# split cannot tell: e.g. every example already classified right.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0
# Equal-width confidence bins of the ECE (Guo et al. 2017 use 15).
ECE_BINS = 15
# Golden-section stops when the bracket of log T is narrower than this.
_LOG_TOLERANCE = 1e-7


def check_config(config):
  """Checks `calibration_split`: None, or a split not overlapping the others.

  Read from the config alone (no data): a calibration split that shares
  examples with the train split would fit T on examples the model was
  trained on (over-confident there, so T too low), and one that shares
  them with the eval split would make the reported ECE after calibration
  optimistic.

  Raises:
    ConfigError: not a single split string, or it may overlap.
  """
  split = config.calibration_split
  if split is None:
    return
  fix = ('Hold out a split of its own: for an image folder a split folder '
         '(e.g. --config.calibration_split=val), for tfds a slice, e.g. '
         '--config.train_split="train[:90%]" '
         '--config.calibration_split="train[90%:]"; or None for no '
         'calibration.')
  if not isinstance(split, str) or not split.strip():
    raise errors.ConfigError(
        f'calibration_split must be None or a split name. Received: '
        f'calibration_split={split!r}. {fix}')
  try:
    calibration = _interval(split)
  except errors.DataError as error:
    raise errors.ConfigError(
        f'calibration_split must be one split, optionally sliced. Received: '
        f'calibration_split={split!r} ({error}). {fix}') from error
  others = [('train_split', config.train_split)]
  if not config.validation_fraction:
    # With a validation fraction the eval part is carved from train_split.
    others.append(('eval_split', config.eval_split))
  for name, other in others:
    try:
      overlap = _may_overlap(calibration, _interval(other))
    except errors.DataError:
      overlap = True  # Not parseable (e.g. 'train+test'): cannot tell.
    if overlap:
      raise errors.ConfigError(
          f'calibration_split may share examples with {name}: the '
          'temperature must be fitted on examples neither trained on nor '
          f'evaluated on. Received: calibration_split={split!r}, '
          f'{name}={other!r}. Slices of one split are told apart only when '
          'both are in percent or both in non-negative indices. ' + fix)


def _interval(split):
  """`(name, start, end, unit)` of a split string; unit '%' or '' (index).

  Open ends are 0 and 100%; negative percents count from the end. Unit None
  when the two bounds mix units or an index is negative (not comparable
  without the split's size).
  """
  name, start, end = folders.parse_split(split)
  if '+' in name:
    raise errors.DataError(f'{split!r} joins splits (+)')
  bounds, units = [], set()
  for text, default in ((start, None), (end, None)):
    if text is None:
      bounds.append(default)
      continue
    unit = '%' if text.endswith('%') else ''
    value = float(text.rstrip('%'))
    if value < 0:
      if unit != '%':
        return name.strip(), None, None, None
      value += 100
    units.add(unit)
    bounds.append(value)
  if len(units) > 1:
    return name.strip(), None, None, None
  unit = units.pop() if units else '%'
  if bounds[0] is None:
    bounds[0] = 0.0
  if bounds[1] is None:
    bounds[1] = 100.0 if unit == '%' else math.inf
  return name.strip(), bounds[0], bounds[1], unit


def _may_overlap(first, second):
  """Whether two `_interval`s may share examples."""
  if first[0] != second[0]:
    return False  # Different splits.
  if first[3] is None or first[3] != second[3]:
    return True  # Cannot tell without the split's size: refused.
  return max(first[1], second[1]) < min(first[2], second[2])


def softmax(logits, temperature=1.0):
  """Row softmax of `logits / temperature`, float64."""
  scaled = np.asarray(logits, np.float64) / temperature
  exponentials = np.exp(scaled - scaled.max(-1, keepdims=True))
  return exponentials / exponentials.sum(-1, keepdims=True)


def negative_log_likelihood(logits, labels, temperature=1.0):
  """Mean -log softmax(logits / T)[label], float64."""
  scaled = np.asarray(logits, np.float64) / temperature
  largest = scaled.max(-1, keepdims=True)
  log_normalizer = largest[:, 0] + np.log(
      np.exp(scaled - largest).sum(-1))
  labels = np.asarray(labels, np.int64)
  return float(np.mean(
      log_normalizer - scaled[np.arange(len(labels)), labels]))


def fit_temperature(logits, labels):
  """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimizing the NLL.

  Golden-section search over log T (see the module docstring).

  Args:
    logits: `[N, C]` logits of a held-out split.
    labels: `[N]` int class ids.

  Returns:
    T, a float.

  Raises:
    DataError: no examples, or logits that are not finite.
  """
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels, np.int64)
  if logits.ndim != 2 or not len(logits) or len(labels) != len(logits):
    raise errors.DataError(
        'Temperature scaling needs [N, C] logits and N labels, N > 0. '
        f'Received: logits {logits.shape}, labels {labels.shape}.')
  if not np.isfinite(logits).all():
    raise errors.DataError('The calibration split gives logits that are not '
                           'finite: no temperature can be fitted.')
  objective = lambda u: negative_log_likelihood(logits, labels, math.exp(u))
  low, high = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
  ratio = (math.sqrt(5) - 1) / 2
  inner_low = high - ratio * (high - low)
  inner_high = low + ratio * (high - low)
  value_low, value_high = objective(inner_low), objective(inner_high)
  while high - low > _LOG_TOLERANCE:
    if value_low <= value_high:
      high, inner_high, value_high = inner_high, inner_low, value_low
      inner_low = high - ratio * (high - low)
      value_low = objective(inner_low)
    else:
      low, inner_low, value_low = inner_low, inner_high, value_high
      inner_high = low + ratio * (high - low)
      value_high = objective(inner_high)
  temperature = math.exp((low + high) / 2)
  if min(abs(temperature - MIN_TEMPERATURE) / MIN_TEMPERATURE,
         abs(temperature - MAX_TEMPERATURE) / MAX_TEMPERATURE) < 1e-3:
    logging.warning(
        'The fitted temperature %.4g is at a bound of the search [%g, %g]: '
        'the calibration split cannot pin it down (e.g. every example '
        'classified right, with any confidence). Use a larger calibration '
        'split.', temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
  return temperature


def reliability_bins(probabilities, labels, bins=ECE_BINS):
  """Per equal-width confidence bin: `(count, accuracy, confidence)` arrays.

  Bin m (1-based) holds the examples with (m-1)/M < confidence <= m/M; an
  empty bin has accuracy and confidence NaN.
  """
  probabilities = np.asarray(probabilities, np.float64)
  labels = np.asarray(labels, np.int64)
  confidence = probabilities.max(-1)
  correct = (probabilities.argmax(-1) == labels).astype(np.float64)
  index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0,
                  bins - 1)
  counts = np.bincount(index, minlength=bins)
  with np.errstate(invalid='ignore', divide='ignore'):
    accuracy = np.bincount(index, correct, minlength=bins) / counts
    mean_confidence = np.bincount(index, confidence, minlength=bins) / counts
  return counts, accuracy, mean_confidence


def expected_calibration_error(probabilities, labels, bins=ECE_BINS):
  """ECE: sum over bins of (n_m / N) |accuracy_m - confidence_m|."""
  counts, accuracy, confidence = reliability_bins(probabilities, labels,
                                                  bins)
  used = counts > 0
  return float(np.sum(counts[used] / counts.sum() *
                      np.abs(accuracy[used] - confidence[used])))


def fit_record(logits, labels, split, step, weights):
  """Fits T on a calibration split's logits; returns the record to keep.

  Args:
    logits: `[N, C]` logits of the calibration split.
    labels: `[N]` its class ids.
    split: The split's name (`config.calibration_split`), recorded.
    step: The training step of the weights.
    weights: Which weights ('ema' or 'raw').

  Returns:
    A JSON-able dict: temperature, split, num_examples, step, weights, and
    the NLL and ECE on the calibration split before (T = 1) and after.
  """
  temperature = fit_temperature(logits, labels)
  record = {
      'temperature': temperature,
      'split': split,
      'num_examples': int(len(labels)),
      'step': int(step),
      'weights': weights,
      'nll': negative_log_likelihood(logits, labels),
      'nll_calibrated': negative_log_likelihood(logits, labels, temperature),
      'ece': expected_calibration_error(softmax(logits), labels),
      'ece_calibrated': expected_calibration_error(
          softmax(logits, temperature), labels),
  }
  logging.info(
      'Temperature scaling on %s (%d examples): T=%.4f; NLL %.4f -> %.4f, '
      'ECE %.4f -> %.4f there.', split, len(labels), temperature,
      record['nll'], record['nll_calibrated'], record['ece'],
      record['ece_calibrated'])
  return record


def record_path(workdir):
  """`<workdir>/calibration.json`: the record of `fit_record`."""
  return workdir_lib.Workdir(workdir).calibration_file


def write_record(workdir, record):
  files.write_json(record_path(workdir), record)


def remove_record(workdir):
  """Forgets a T fitted for weights the run no longer exports."""
  if os.path.exists(record_path(workdir)):
    os.remove(record_path(workdir))


def read_record(path):
  """The record in `path` (calibration.json), checked before it is served.

  A hand-edited or damaged file must not reach an export: a temperature
  of 0, NaN, a string, or one so small that float32 logits / T overflow
  would make every `probabilities` NaN. The fit only returns T in
  [MIN_TEMPERATURE, MAX_TEMPERATURE], so anything else was not fitted.

  Raises:
    DataError: not a JSON object, or its temperature or step is not one
      the fit writes; the message names the file and the fixes.
  """
  record = files.read_json_object(path)
  temperature, step = record.get('temperature'), record.get('step')
  fix = ('It was damaged or edited. Delete it to export uncalibrated '
         '(T = 1), or rerun the run\'s training command, which fits T '
         'again without training.')
  if not (errors.is_number(temperature) and math.isfinite(temperature) and
          MIN_TEMPERATURE * (1 - 1e-9) <= temperature <=
          MAX_TEMPERATURE * (1 + 1e-9)):
    raise errors.DataError(
        f'{path} holds temperature={temperature!r}; a fitted temperature is '
        f'a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]. {fix}')
  if not (isinstance(step, int) and not isinstance(step, bool) and
          step >= 0):
    raise errors.DataError(
        f'{path} holds step={step!r}, not the training step the temperature '
        f'was fitted for (an integer >= 0). {fix}')
  return record


def temperature_for_export(workdir, weights_file, step):
  """`(T, record)` an export of these weights serves; `(1.0, None)` if none.

  T applies only to the weights it was fitted for: the run's final weights
  (`final.weights.h5`, or the newest backup restored and re-derived) at the
  recorded step; `best.weights.h5` or another step get T = 1, logged.

  Args:
    workdir: The run directory.
    weights_file: The weights restored (a path or file name).
    step: Their training step.
  """
  path = record_path(workdir)
  if not os.path.exists(path):
    return 1.0, None
  record = read_record(path)
  if (os.path.basename(weights_file) == checkpoints.BEST_WEIGHTS or
      record.get('step') != step):
    logging.warning(
        'The temperature T=%.4g in %s was fitted for the final weights at '
        'step %s; these (%s, step %d) are served uncalibrated (T = 1).',
        record.get('temperature'), path, record.get('step'),
        os.path.basename(weights_file), step)
    return 1.0, None
  return float(record['temperature']), record
