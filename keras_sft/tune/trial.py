"""One trial: an ordinary run in `<workdir>/trials/<n>/`, pruned on its
per-epoch validation accuracy.

The run is `train.train_and_evaluate` on the trial's config (the study's
config with the trial's values and the validation split of `splits`), so
every check and guarantee of a run holds: a rerun resumes it, a workdir of
another config is refused. A trial that is retried after its worker died
(`RetryHeartbeatStaleTrialCallback` records the first trial's number) runs
in the first trial's workdir and resumes its last backup; the epochs that
were already run are reported again from `history.csv`, so the pruner sees
the whole curve.
"""

import csv
import dataclasses
import gc
import logging
import math
import os
import shutil
import threading
import time

import keras
import optuna

from keras_sft import errors
from keras_sft import files
from keras_sft import workdir as workdir_lib
from keras_sft.tune import space as space_lib
from keras_sft.tune import splits

TRIALS = 'trials'
# Trial user attributes (shown in Optuna's dashboard too).
WORKDIR_ATTR = 'workdir'
WORKER_ATTR = 'worker'
EPOCHS_ATTR = 'epochs_run'
FAILURE_ATTR = 'failure'
SECONDS_ATTR = 'wall_seconds'
# The number of validation images a complete trial was scored on (the
# summary says how far apart two scores must be to mean anything).
VALIDATION_IMAGES_ATTR = 'validation_images'
# The metric a trial is scored on (the validation part of the training
# split; see `splits`).
METRIC = 'val_accuracy'


def trial_number_of_run(frozen_trial):
  """The number whose workdir the trial runs in: its first attempt's."""
  first = frozen_trial.system_attrs.get('failed_trial')
  return frozen_trial.number if first is None else first


def trial_workdir(workdir, number):
  return os.path.join(workdir, TRIALS, str(number))


def history_accuracies(run_workdir):
  """`[(epoch, val_accuracy)]` of a run's history.csv (1-based epochs)."""
  path = workdir_lib.Workdir(run_workdir).history_csv
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, newline='') as file:
    for row in csv.DictReader(file):
      try:
        value = float(row.get(METRIC) or 'nan')
        rows.append((int(row['epoch']) + 1, value))
      except (KeyError, ValueError):
        continue  # A torn last line.
  return [(epoch, value) for epoch, value in rows if math.isfinite(value)]


# Config keys (in epochs) during which a run does not yet train at its peak:
# the learning-rate warmup and the head-only phase.
_PHASE_KEYS = ('warmup_epochs', 'head_only_epochs')


def first_pruning_epoch(config, space=None):
  """The first epoch after which a trial may be pruned.

  One whole epoch after the warmup and the head-only phase end (at the
  largest values `space` can give them), at most `config.num_epochs`: 2
  with the default 1-epoch warmup, 3 where head_only_epochs may reach 2.
  Earlier, a trial is judged before it has trained at its own learning rate
  (from scratch, epoch-1 accuracies sat near chance: benchmarks/tune.py's
  first study pruned 9 of 10 trials after epoch 1 and kept the defaults),
  and a head-only trial is judged against full ones on a phase it has not
  left. It does not grow with num_epochs (an earlier rule took a quarter of
  them): every trial pays it, so 12 trials cost at least 12 x r / num_epochs
  runs, 3 whatever the data with a quarter.

  Args:
    config: The study's base config (num_epochs and the phase keys).
    space: None, or the `space.Space` whose ranges the phases may take.
  """
  varied = set(space.keys) if space is not None else set()
  # The config's own value counts only where the space does not set it.
  phases = [float(config.get(key) or 0) for key in _PHASE_KEYS
            if key not in varied]
  for parameter in space.parameters if space is not None else ():
    if parameter.key in _PHASE_KEYS:
      values = (parameter.choices if parameter.kind == 'categorical'
                else (parameter.high,))
      phases.extend(float(value or 0) for value in values)
  return max(1, min(config.num_epochs, math.ceil(max(phases, default=0)) + 1))


def last_pruning_epoch(config, space=None):
  """The last epoch after which a trial may be pruned.

  Pruning later saves fewer epochs than the first pruning epoch, and a
  trial within that reach of its end is judged on the noise of a small
  validation part for little gain (the fine-tuning study of
  benchmarks/tune-2026-12-06-fashion_mnist.txt pruned a trial that tied the
  defaults at epoch 9 of 10).
  """
  first = first_pruning_epoch(config, space)
  if first >= config.num_epochs:
    # Judged after its last epoch, a trial would have run its whole budget
    # and lose its result: no pruning (`pruning_is_possible`).
    return 0
  return max(first, config.num_epochs - first)


def pruning_is_possible(config, space=None):
  """Whether a trial can be pruned before its last epoch."""
  return last_pruning_epoch(config, space) > 0


class PruningCallback(keras.callbacks.Callback):
  """Reports each epoch's val_accuracy; raises `optuna.TrialPruned` to stop.

  Raising (rather than `stop_training`) ends the run at once: the run's own
  callbacks have logged and backed up the epoch before this one runs.
  """

  def __init__(self, trial, reported, last_epoch):
    super().__init__()
    self.trial = trial
    self.reported = reported
    self.last_epoch = last_epoch

  def on_epoch_end(self, epoch, logs=None):
    value = (logs or {}).get(METRIC)
    if value is None or not math.isfinite(float(value)):
      return
    report(self.trial, epoch + 1, float(value), self.reported,
           self.last_epoch)


# A trial's score at an epoch: the mean val accuracy of its last this many
# epochs. One epoch's accuracy on a small validation part jumps: the
# defaults of a fine-tuning study scored 0.74, 0.78, 0.88, 0.82 at epochs
# 7-10 on 50 images, and its epoch-9 spike pruned both trials without
# random crop, which then scored 0.84 and 0.86 there and 0.84-0.86 on
# average (benchmarks/tune.py, 2026-12-06).
SMOOTHING_EPOCHS = 3


def score(accuracies, epoch):
  """The mean of `accuracies` ({epoch: val accuracy}) over the last
  `SMOOTHING_EPOCHS` epochs up to `epoch` (those it holds)."""
  window = [accuracies[previous] for previous in
            range(epoch - SMOOTHING_EPOCHS + 1, epoch + 1)
            if previous in accuracies]
  return sum(window) / len(window)


def report(trial, epoch, value, reported, last_epoch):
  """Keeps `value`, the val accuracy of `epoch`, in the dict `reported` and
  reports the trial's `score` there; raises `TrialPruned` if the pruner
  says so, up to `last_epoch` (see `last_pruning_epoch`)."""
  reported[epoch] = value
  smoothed = score(reported, epoch)
  trial.report(smoothed, epoch)
  if epoch <= last_epoch and trial.should_prune():
    raise optuna.TrialPruned(
        f'{METRIC}={smoothed:.4f} (mean of the last {SMOOTHING_EPOCHS} '
        f'epochs) after epoch {epoch}: below the trials that reached this '
        'epoch')


def discard_backups(workdir, frozen):
  """Removes the backups of a finished trial's run (not its history)."""
  run_workdir = trial_workdir(workdir, trial_number_of_run(frozen))
  shutil.rmtree(workdir_lib.Workdir(run_workdir).checkpoints,
                ignore_errors=True)


@dataclasses.dataclass
class Outcome:
  """How a trial ended.

  Attributes:
    state: An `optuna.trial.TrialState`.
    value: The score (COMPLETE), else the last reported val_accuracy.
    epochs: Epochs in the run's history.
    message: Why it was pruned or failed.
  """
  state: object
  value: float = None
  epochs: int = 0
  message: str = ''


def _write_hparams(run_workdir, number, values):
  """The trial's session for TensorBoard's HParams dashboard.

  Written once into the run's `tensorboard/`, whose `validation/` run holds
  the per-epoch `epoch_accuracy` the dashboard shows for the session.
  """
  directory = os.path.join(workdir_lib.Workdir(run_workdir).tensorboard)
  marker = os.path.join(directory, '.hparams')
  if os.path.exists(marker):
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import api as hparams_api  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  writer = tf.summary.create_file_writer(directory)
  with writer.as_default():
    hparams_api.hparams({key: _hparam_value(value)
                         for key, value in values.items()},
                        trial_id=f'trial {number}')
  writer.close()
  files.atomic_write(marker, '')


def _hparam_value(value):
  # The HParams plugin takes bool, int, float and str; None is a choice too.
  return 'None' if value is None else value


def run(trial, frozen, space, config, workdir, validation_fraction):
  """Runs (or resumes) one trial; returns its `Outcome`.

  Args:
    trial: The `optuna.Trial` (RUNNING, owned by this worker).
    frozen: Its `FrozenTrial` as popped (attributes of a retried trial).
    space: The study's `space.Space`.
    config: The study's base config.
    workdir: The study's directory.
    validation_fraction: See `splits.search_config`.

  Raises:
    Exceptions of bugs (the trial stays RUNNING: the next worker finds its
    worker gone and retries it).
  """
  # Imported here: it loads TensorFlow, and the command's `--help` must not.
  from keras_sft.training import train  # pylint: disable=g-import-not-at-top
  number = trial_number_of_run(frozen)
  run_workdir = trial_workdir(workdir, number)
  values = space.suggest(trial)
  trial.set_user_attr(WORKDIR_ATTR, os.path.relpath(run_workdir, workdir))
  trial_config = splits.search_config(space_lib.apply(config, values),
                                      validation_fraction)
  os.makedirs(run_workdir, exist_ok=True)
  _write_hparams(run_workdir, number, values)
  started = time.monotonic()
  previous_seconds = float(frozen.user_attrs.get(SECONDS_ATTR) or 0)

  def finish(outcome):
    outcome.epochs = len(history_accuracies(run_workdir))
    trial.set_user_attr(EPOCHS_ATTR, outcome.epochs)
    trial.set_user_attr(SECONDS_ATTR, round(
        previous_seconds + time.monotonic() - started, 1))
    if outcome.message:
      trial.set_user_attr(FAILURE_ATTR, outcome.message)
    return outcome

  # Clean state per trial: the previous trial's model and tracing are not
  # kept, and the layer names restart as in a fresh process.
  keras.backend.clear_session()
  reported = {}
  pruned_box = []
  try:
    # A resumed trial: report the epochs already run (their rows are kept
    # by the run), then go on.
    last_epoch = last_pruning_epoch(config, space)
    for epoch, value in history_accuracies(run_workdir):
      report(trial, epoch, value, reported, last_epoch)
    metrics = train.train_and_evaluate(
        trial_config, run_workdir,
        callbacks=[PruningCallback(trial, reported, last_epoch)])
  except optuna.TrialPruned as pruned:
    # Kept past this block: see release_in_background.
    pruned_box.append(pruned)
  except errors.DivergedError as error:
    # An outcome of the values (a learning rate too high), not a fault.
    return finish(Outcome(optuna.trial.TrialState.FAIL,
                          message=f'diverged: {error}'))
  except errors.ConfigError as error:
    # A combination the space's check could not foresee (values inside
    # the ranges); the study goes on with the other trials.
    return finish(Outcome(optuna.trial.TrialState.FAIL,
                          message=f'refused: {error}'))
  if pruned_box:
    message = f'pruned: {pruned_box[0]}'
    logging.info('Trial %d %s', trial.number, message)
    release_in_background(pruned_box)
    last = score(reported, max(reported)) if reported else None
    return finish(Outcome(optuna.trial.TrialState.PRUNED, last,
                          message=message))
  # The score of its last epoch, whose val accuracy is the final
  # evaluation's (the same weights and data, logged by the run).
  accuracies = dict(history_accuracies(run_workdir))
  accuracies[trial_config.num_epochs] = float(metrics['eval']['accuracy'])
  if metrics.get('report'):
    trial.set_user_attr(VALIDATION_IMAGES_ATTR,
                        int(metrics['report']['num_examples']))
  value = score(accuracies, trial_config.num_epochs)
  return finish(Outcome(optuna.trial.TrialState.COMPLETE, value))


def release_in_background(box):
  """Empties the list `box` in another thread; returns at once.

  A pruned trial's `TrialPruned` holds, through its traceback, the frames
  of `model.fit` and with them the training iterator, whose tf.data
  destructor then sleeps on its background threads: 10-26 s with no CPU
  used after every other pruned trial (measured on the 2-core CPU: 15% of
  a fine-tuning study's wall time). Dropping the last reference in a thread
  lets that wait overlap the next trial. Not a daemon: the process waits
  for it before exiting, as it did before.

  Args:
    box: A list holding the only references to what is to be released; the
      caller keeps none.
  """
  def release():
    box.clear()
    # What remains is in reference cycles (Keras models, the other
    # iterator): collected here too, not at the next trial's first
    # automatic collection on the main thread.
    gc.collect()

  threading.Thread(target=release, name='keras_sft-release').start()
