"""What a study found, for a person: a table, plots and a summary in words.

`write(study, space, workdir)` writes into the study's directory

  leaderboard.csv   one row per trial, best first: its values, val accuracy,
                    epochs run, wall time, state (pruned or not), workdir
  plots/*.png       optimization history, parameter importances, parallel
                    coordinates, val accuracy against each key (Optuna's
                    matplotlib plots)
  summary.txt       the table and the summary in words
  trials/           TensorBoard's HParams experiment (each trial's run is a
                    session: `tensorboard --logdir <workdir>`)

and returns the text it printed: the table, then the best values against
the defaults and the keys that mattered most.
"""

import csv
import io
import logging
import math
import os
import warnings

import optuna

from keras_sft import files
from keras_sft.tune import study as study_lib
from keras_sft.tune import trial as trial_lib

LEADERBOARD = 'leaderboard.csv'
SUMMARY = 'summary.txt'
PLOTS = 'plots'

TrialState = optuna.trial.TrialState
_ORDER = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.FAIL: 2,
          TrialState.RUNNING: 3, TrialState.WAITING: 4}


def _state(trial, successor):
  if successor is not None:
    return f'killed (retried as trial {successor})'
  return {TrialState.COMPLETE: 'complete', TrialState.PRUNED: 'pruned',
          TrialState.FAIL: 'failed', TrialState.RUNNING: 'running',
          TrialState.WAITING: 'waiting'}[trial.state]


def rows(study, space):
  """One dict per trial, best first (complete, pruned, failed, unfinished)."""
  trials = study.get_trials(deepcopy=False)
  successors = {}
  for trial in trials:
    history = trial.system_attrs.get('retry_history', [])
    if history:
      successors[history[-1]] = trial.number
  result = []
  for trial in trials:
    value = trial.value if trial.values else None
    if value is None and trial.intermediate_values:
      value = trial.intermediate_values[max(trial.intermediate_values)]
    row = {'trial': trial.number}
    row.update({key: trial.params.get(key, '') for key in space.keys})
    row.update({
        'val_accuracy': value,
        'epochs_run': trial.user_attrs.get(trial_lib.EPOCHS_ATTR, ''),
        'wall_seconds': trial.user_attrs.get(trial_lib.SECONDS_ATTR, ''),
        'pruned': trial.state == TrialState.PRUNED,
        'state': _state(trial, successors.get(trial.number)),
        'defaults': bool(trial.user_attrs.get(study_lib.DEFAULTS_ATTR)),
        # The one key a variant trial changed from the defaults.
        'changed_from_defaults': trial.user_attrs.get(study_lib.VARIANT_ATTR,
                                                      ''),
        'workdir': trial.user_attrs.get(trial_lib.WORKDIR_ATTR, ''),
        'note': trial.user_attrs.get(trial_lib.FAILURE_ATTR, '')[:200],
    })
    row['_sort'] = (successors.get(trial.number) is not None,
                    _ORDER[trial.state],
                    -(value if value is not None else -math.inf),
                    trial.number)
    result.append(row)
  result.sort(key=lambda row: row.pop('_sort'))
  return result


def _text(value):
  if isinstance(value, float):
    return f'{value:.4g}'
  return '' if value is None else str(value)


def write_leaderboard(table_rows, path):
  output = io.StringIO()
  if table_rows:
    writer = csv.DictWriter(output, fieldnames=list(table_rows[0]))
    writer.writeheader()
    writer.writerows(table_rows)
  files.atomic_write(path, output.getvalue())


def table(table_rows, keys):
  """The leaderboard as aligned text columns."""
  columns = (['trial'] + list(keys) +
             ['val_accuracy', 'epochs_run', 'wall_seconds', 'state'])
  def label(row):
    if row['defaults']:
      return ' (defaults)'
    return f' ({row["changed_from_defaults"]})' if row.get(
        'changed_from_defaults') else ''

  cells = [[_text(row[column]) + (label(row) if column == 'trial' else '')
            for column in columns] for row in table_rows]
  widths = [max([len(column)] + [len(line[i]) for line in cells])
            for i, column in enumerate(columns)]
  lines = ['  '.join(column.ljust(width)
                     for column, width in zip(columns, widths))]
  lines += ['  '.join(cell.ljust(width) for cell, width in zip(line, widths))
            for line in cells]
  return '\n'.join(lines)


def importances(study):
  """`{key: importance}` (fANOVA, Optuna's default), or a reason string."""
  complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  if len(complete) < 2:
    return (f'{len(complete)} complete trial(s): too few to rank the keys '
            '(needs 2 or more)')
  if len({trial.value for trial in complete}) == 1:
    # fANOVA then splits nothing and gives every key the same share (1/n):
    # a ranking of noise.
    return (f'all {len(complete)} complete trials scored '
            f'{complete[0].value:.4f}: no key changed the score')
  # Only the keys whose values differ between complete trials: fANOVA on
  # two trials that differed in random_crop alone ranked head_only_epochs,
  # label_smoothing and the LR multiplier first (0.18 each), keys both
  # trials shared.
  keys = sorted({key for trial in complete for key in trial.params})
  varied = [key for key in keys
            if len({repr(trial.params.get(key)) for trial in complete}) > 1]
  if not varied:
    return (f'the {len(complete)} complete trials share every value: their '
            'scores differ by the noise of training alone')
  if len(varied) == 1:
    return {varied[0]: 1.0}
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      return optuna.importance.get_param_importances(study, params=varied)
  except (RuntimeError, ValueError) as error:
    return f'keys not ranked: {error}'


def write_plots(study, directory):
  """Optuna's matplotlib plots as PNGs; returns `{name: path or reason}`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  from optuna.visualization import matplotlib as plots  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  written = {}
  for name, function in (('optimization_history',
                          plots.plot_optimization_history),
                         ('param_importances', plots.plot_param_importances),
                         ('parallel_coordinate', plots.plot_parallel_coordinate),
                         ('val_accuracy_vs_each_key', plots.plot_slice)):
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # Optuna's ExperimentalWarning.
        axes = function(study)
      figure = (axes.flat[0] if hasattr(axes, 'flat') else axes).figure
      path = os.path.join(directory, f'{name}.png')
      temporary = os.path.join(directory, f'.tmp-{os.getpid()}-{name}.png')
      figure.savefig(temporary, dpi=100, bbox_inches='tight')
      os.replace(temporary, path)
      pyplot.close(figure)
      written[name] = path
    except Exception as error:  # pylint: disable=broad-except
      # A plot of too few trials (e.g. importances of one) is no failure.
      written[name] = f'skipped: {type(error).__name__}: {error}'
      pyplot.close('all')
  return written


def write_hparams_experiment(workdir, space):
  """TensorBoard's HParams experiment: the keys and the metric, once."""
  directory = os.path.join(workdir, trial_lib.TRIALS)
  marker = os.path.join(directory, '.hparams_experiment')
  if os.path.exists(marker):
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import api as hparams_api  # pylint: disable=g-import-not-at-top
  hparams = []
  for parameter in space.parameters:
    if parameter.kind == 'categorical':
      domain = hparams_api.Discrete(
          ['None' if choice is None else str(choice)
           for choice in parameter.choices]
          if len({type(c) for c in parameter.choices}) > 1 or
          None in parameter.choices else list(parameter.choices))
    elif parameter.kind == 'int':
      domain = hparams_api.IntInterval(parameter.low, parameter.high)
    else:
      domain = hparams_api.RealInterval(parameter.low, parameter.high)
    hparams.append(hparams_api.HParam(parameter.key, domain))
  os.makedirs(directory, exist_ok=True)
  writer = tf.summary.create_file_writer(directory)
  with writer.as_default():
    hparams_api.hparams_config(
        hparams=hparams,
        metrics=[hparams_api.Metric('epoch_accuracy', group='validation',
                                    display_name='val accuracy')])
  writer.close()
  files.atomic_write(marker, '')


def _values_text(params):
  return ', '.join(f'{key}={value!r}' for key, value in params.items())


# Below this many validation images no difference is called beyond noise:
# with 10 images, 10/10 against 7/10 is a Fisher p of 0.21.
MIN_VALIDATION_IMAGES = 20


def _validation_images(trial):
  """The count a complete trial recorded, or None if absent or malformed."""
  count = trial.user_attrs.get(trial_lib.VALIDATION_IMAGES_ATTR)
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    return None
  return count


def noise_text(best, defaults, compared=2):
  """Whether `best` beat `defaults` (complete trials) by more than the
  sampling noise of their validation images; '' when that is unknown.

  Two standard errors of the difference of two accuracies, each measured on
  its trial's n validation images, with Agresti and Caffo's adjustment (one
  success and one failure added to each: the plain formula gives no noise
  at all at 100% or 0%): sqrt(p1 (1 - p1) / (n1 + 2) + p0 (1 - p0) /
  (n0 + 2)), p = (correct + 1) / (n + 2). Both trials are scored on the
  same images, so this overstates the noise of the images; it ignores the
  noise of training (seeds) and that `best` is the best of `compared`
  trials, so a lead beyond it is likely, not certain, to hold.

  Args:
    best: The best complete `FrozenTrial`.
    defaults: The defaults' complete `FrozenTrial`.
    compared: How many complete trials `best` was chosen from.
  """
  best_count = _validation_images(best)
  if best_count is None or best.number == defaults.number:
    return ''
  # The validation part is fixed per study; a defaults trial without the
  # count (recorded before the count was) scored on the same images.
  defaults_count = _validation_images(defaults) or best_count
  values = (best.value, defaults.value)
  if not all(isinstance(value, (int, float)) and 0 <= value <= 1
             for value in values):
    return ''
  count = min(best_count, defaults_count)
  noun, verb = ('image', 'is') if count == 1 else ('images', 'are')
  if count < MIN_VALIDATION_IMAGES:
    return (f'{count} validation {noun} {verb} too few to tell trials apart: '
            'a larger --validation_fraction (or more images) would.')
  variance = 0.0
  for value, images in zip(values, (best_count, defaults_count)):
    adjusted = (value * images + 1) / (images + 2)
    variance += adjusted * (1 - adjusted) / (images + 2)
  margin = 100 * 2 * math.sqrt(variance)
  difference = 100 * (best.value - defaults.value)
  if difference > margin:
    return (f'The lead is more than the noise of {count} validation images '
            f'(2 standard errors: {margin:.1f} points); as the best of '
            f'{compared} trials, part of it may still be luck.')
  return (f'The difference is within the noise of {count} validation images '
          f'(2 standard errors: {margin:.1f} points): the defaults may be as '
          'good. A larger --validation_fraction (or more images) tells them '
          'apart.')


def summary(study, space, rerun_command=None):
  """The study's result in words: best against defaults, keys that matter."""
  trials = study.get_trials(deepcopy=False)
  kept = study_lib.counted(trials)
  complete = [t for t in kept if t.state == TrialState.COMPLETE]
  counts = {state: sum(t.state == state for t in kept)
            for state in (TrialState.COMPLETE, TrialState.PRUNED,
                          TrialState.FAIL)}
  killed = len(trials) - len(kept)
  lines = [f'{len(kept)} trials: {counts[TrialState.COMPLETE]} complete, '
           f'{counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} '
           f'failed' + (f'; {killed} attempt(s) killed and resumed by a retry'
                        if killed else '') + '.']
  if not complete:
    lines.append('No trial completed: no best configuration yet.')
    return '\n'.join(lines)
  best = max(complete, key=lambda t: t.value)
  defaults = [t for t in complete
              if t.user_attrs.get(study_lib.DEFAULTS_ATTR)]
  comparison = ''
  if defaults:
    difference = 100 * (best.value - defaults[0].value)
    comparison = (f' vs {100 * defaults[0].value:.1f}% for the defaults '
                  f'(trial {defaults[0].number}; {difference:+.1f} points)')
  lines.append(f'Best: trial {best.number}, {_values_text(best.params)}: '
               f'val accuracy {100 * best.value:.1f}%{comparison}.')
  if defaults:
    noise = noise_text(best, defaults[0], len(complete))
    if noise:
      lines.append(noise)
  ranked = importances(study)
  if isinstance(ranked, str):
    lines.append(f'Which keys mattered: {ranked}.')
  else:
    top = list(ranked.items())[:3]
    lines.append('Keys that mattered most (fANOVA importance over the '
                 f'{len(complete)} complete trials): ' +
                 ', '.join(f'{key} {value:.2f}' for key, value in top) + '.')
  if rerun_command:
    lines.append(f'Rerun the best trial as an ordinary run: {rerun_command}')
  return '\n'.join(lines)


def write(study, space, workdir, rerun_command=None):
  """Writes the leaderboard, plots, HParams experiment and summary.

  Returns:
    The text of the table and summary (also in `summary.txt`).
  """
  table_rows = rows(study, space)
  write_leaderboard(table_rows, os.path.join(workdir, LEADERBOARD))
  plots = write_plots(study, os.path.join(workdir, PLOTS))
  for name, result in plots.items():
    if not result.endswith('.png'):
      logging.info('Plot %s %s', name, result)
  try:
    write_hparams_experiment(workdir, space)
  except Exception as error:  # pylint: disable=broad-except
    logging.warning('TensorBoard HParams experiment not written: %s', error)
  text = (table(table_rows, space.keys) + '\n\n' +
          summary(study, space, rerun_command))
  files.atomic_write(os.path.join(workdir, SUMMARY), text + '\n')
  return text
