"""The callbacks of a run's `fit`, and the one function that orders them.

`create(...)` returns the list `train` passes to `fit`, in the order the
callbacks need, and `check_order` states that order as rules and checks
them (a list built otherwise fails at once, not by a subtle resume bug):

1. `StopOnDivergence` first: the callbacks after it see `stop_training` at
   the same step, so none backs up or keeps diverged weights.
2. `BestWeightsCallback` before `evaluation_weights.EvaluationWeights`: at
   an epoch end the model still holds the evaluated weights (EMA, precise
   BN) when the best ones are saved; EvaluationWeights then puts the
   training state back.
3. `BackupCallback` after both and after the loggers: a backup at an epoch
   end means the epoch's evaluation and history row are written, and it
   holds the training state.
4. The caller's callbacks (`train_and_evaluate(callbacks=...)`) after the
   run's own, so a pruned tuning trial that stops by raising loses nothing.
5. `PreemptionCallback` last: on SIGTERM it backs up after all the others
   acted on the step.
"""

import csv
import json
import logging
import math
import os
import signal
import threading

import keras

from keras_sft import errors
from keras_sft import files
from keras_sft.training import checkpoints
from keras_sft.training import evaluation_weights
from keras_sft.training import progress


def _is_last_batch(callback, batch):
  """Whether `batch` (the last of an execution) ends the epoch of `fit`."""
  steps = (callback.params or {}).get('steps')
  return steps is not None and batch + 1 >= steps


class BackupCallback(keras.callbacks.Callback):
  """Backs the run up every `every_steps` training steps and at epoch ends.

  The backup of an epoch's last step is written at the epoch end, so put
  this callback after those that act there (history, best weights): a
  backup at an epoch end then means the epoch's evaluation and history row
  are written, and a run killed before resumes before the epoch's last step
  and does them again.

  Args:
    checkpointer: A `Checkpointer`.
    every_steps: Training steps between backups.
  """

  def __init__(self, checkpointer, every_steps):
    super().__init__()
    self.checkpointer = checkpointer
    self.every_steps = every_steps
    self._last_saved = None

  def _step(self):
    return checkpoints.trained_steps(self.model)

  def _save(self, logs):
    # Never replace a good backup with weights that went NaN, nor back up a
    # run that `StopOnDivergence` is stopping.
    loss = (logs or {}).get('loss')
    if self.model.stop_training or (
        loss is not None and not math.isfinite(float(loss))):
      return
    step = self._step()
    if step == self._last_saved:
      return
    bad = checkpoints.non_finite_variables(self.model)
    if bad:
      logging.warning('No backup at step %d: %s.', step,
                      checkpoints.describe_non_finite(bad))
      return
    self.checkpointer.save(self.model, step)
    self._last_saved = step

  def on_train_begin(self, logs=None):
    self._last_saved = self._step()

  def on_train_batch_end(self, batch, logs=None):
    if _is_last_batch(self, batch):
      return  # Backed up at the epoch end, after its evaluation.
    # A difference, not a modulo: with steps_per_execution > 1 the step
    # counter jumps by more than one between calls.
    if self._step() - self._last_saved >= self.every_steps:
      self._save(logs)

  def on_epoch_end(self, epoch, logs=None):
    self._save(logs)


class StopOnDivergence(keras.callbacks.Callback):
  """Stops `fit` once the loss, the validation loss or a weight is not finite.

  Put it first among the callbacks: those after it see `stop_training` at
  the same step (`BackupCallback` then writes nothing). A diverged model can
  keep finite weights and a finite training loss while its evaluation is
  NaN (BatchNorm statistics overflow), hence the validation loss.

  Attributes:
    reason: None, or what was found not finite, once stopped.
  """

  def __init__(self):
    super().__init__()
    self.reason = None

  def _stop(self, reason):
    self.reason = f'{reason} at step {checkpoints.trained_steps(self.model)}'
    self.model.stop_training = True

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get('loss')
    if loss is not None and not math.isfinite(float(loss)):
      self._stop(f'the training loss is {float(loss)}')

  def on_epoch_end(self, epoch, logs=None):
    if self.reason:
      return
    for key in ('loss', 'val_loss'):
      value = (logs or {}).get(key)
      if value is not None and not math.isfinite(float(value)):
        self._stop(f'{key} is {float(value)} after epoch {epoch + 1}')
        return
    bad = checkpoints.non_finite_variables(self.model)
    if bad:
      self._stop(checkpoints.describe_non_finite(bad))


class PreemptionCallback(keras.callbacks.Callback):
  """On SIGTERM: a backup at the next step boundary, then `PreemptedError`.

  Clusters send SIGTERM before they take a machine away. During an epoch's
  training steps (and the backups written between them) the signal only
  sets a flag; at the end of the current step the model is backed up and
  `errors.PreemptedError` ends `fit`, so a rerun resumes from this step.
  At the last step of an epoch it waits for the epoch end (the evaluation,
  the history row and the backup of `BackupCallback`). Outside the steps (an
  epoch's evaluation with its precise BN pass and EMA swap, the epoch-end
  callbacks, the start of an epoch), and at a second SIGTERM while it
  waits, the signal raises `PreemptedError` at once: those phases can take
  minutes, and a rerun redoes them from the last backup (writes are atomic,
  so nothing is left half-written). Put it last among the callbacks, and
  call `uninstall()` after `fit` (also when `fit` raised). Outside `fit`
  SIGTERM keeps its default action.

  Args:
    checkpointer: A `Checkpointer`; None on the workers of a multi-worker
      run that write nothing (they stop without a backup).
  """

  def __init__(self, checkpointer):
    super().__init__()
    self.checkpointer = checkpointer
    self._previous = None
    self._signaled = False
    # True from an epoch's first step to its last: see the class doc.
    self._in_steps = False

  def _handle(self, signum, frame):
    del signum, frame
    if self._in_steps and not self._signaled:
      self._signaled = True
      return
    self.uninstall()
    step = checkpoints.trained_steps(self.model)
    latest = self.checkpointer.latest() if self.checkpointer else None
    backup = (f'its last backup, {latest[0]} (step {latest[1]})' if latest
              else 'the start (no backup yet)')
    logging.warning('SIGTERM between training steps at step %d: stopped at '
                    'once, without a backup.', step)
    raise errors.PreemptedError(
        f'stopped on SIGTERM at step {step}, between training steps (an '
        'evaluation, precise BN, a backup or the input pipeline), without '
        f'a backup of this step. Rerun the same command: it resumes from '
        f'{backup} and redoes what was interrupted.')

  def on_train_batch_begin(self, batch, logs=None):
    self._in_steps = True

  def on_train_begin(self, logs=None):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def uninstall(self):
    """Gives SIGTERM back its previous handler."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _stop_if_signaled(self):
    if not self._signaled:
      return
    self.uninstall()
    step = checkpoints.trained_steps(self.model)
    where = 'no backup (this worker writes none)'
    if self.checkpointer is not None:
      latest = self.checkpointer.latest()
      if latest is not None and latest[1] == step:
        where = f'its backup {latest[0]}'
      elif checkpoints.non_finite_variables(self.model):
        where = 'no backup: the weights are not finite'
      else:
        where = f'a backup, {self.checkpointer.save(self.model, step)}'
    logging.warning('SIGTERM: stopped at step %d after %s.', step, where)
    raise errors.PreemptedError(
        f'stopped on SIGTERM at step {step}, after {where}. Rerun the same '
        'command to resume.')

  def on_train_batch_end(self, batch, logs=None):
    if not _is_last_batch(self, batch):
      self._stop_if_signaled()
    else:
      # The epoch's evaluation comes next.
      self._in_steps = False

  def on_epoch_end(self, epoch, logs=None):
    self._stop_if_signaled()

  def on_train_end(self, logs=None):
    self._in_steps = False
    self.uninstall()


class BestWeightsCallback(keras.callbacks.Callback):
  """Keeps `best.weights.h5`: the weights of the epoch with the best metric.

  The metric's value and the step are stored inside the file (HDF5
  attributes) before its atomic rename, so a run killed at any moment
  still knows what the kept weights scored and only replaces them with a
  better epoch. `best.json` repeats them for people and tools. Epochs
  without the metric (no evaluation) are skipped.

  Args:
    directory: Where `best.weights.h5` and `best.json` go.
    monitor: A log key that is higher when better.
  """

  def __init__(self, directory, monitor='val_accuracy'):
    super().__init__()
    self.directory = directory
    self.monitor = monitor
    self._best = None

  def on_train_begin(self, logs=None):
    record = checkpoints.best_record(self.directory)
    self._best = None if record is None else record['value']
    pointer = os.path.join(self.directory, checkpoints.BEST_POINTER)
    if record is not None and (
        not os.path.exists(pointer) or
        checkpoints.read_json_or_none(pointer) != record):
      # Killed between the weights and their record: repair the record.
      files.atomic_write(pointer, json.dumps(record))

  def on_epoch_end(self, epoch, logs=None):
    value = (logs or {}).get(self.monitor)
    # A stopped run diverged (`StopOnDivergence`): its accuracy can be
    # finite while its loss and outputs are NaN.
    if (value is None or not math.isfinite(float(value)) or
        self.model.stop_training):
      return
    if self._best is not None and float(value) <= self._best:
      return
    bad = checkpoints.non_finite_variables(self.model)
    if bad:
      logging.warning('%s not replaced: %s.', checkpoints.BEST_WEIGHTS,
                      checkpoints.describe_non_finite(bad))
      return
    os.makedirs(self.directory, exist_ok=True)
    record = {'file': checkpoints.BEST_WEIGHTS, 'monitor': self.monitor,
              'value': float(value),
              'step': checkpoints.trained_steps(self.model)}
    prefix = checkpoints.ATTRIBUTE_PREFIX
    checkpoints.write_weights(
        self.model, self.directory, checkpoints.BEST_WEIGHTS,
        attributes={f'{prefix}{key}': item for key, item in record.items()})
    self._best = float(value)
    files.atomic_write(os.path.join(self.directory, checkpoints.BEST_POINTER),
                       json.dumps(record))



class HistoryLogger(keras.callbacks.CSVLogger):
  """Keras' CSVLogger (`history.csv`, appended to) with one header per run.

  Keras' logger takes its columns from the first epoch each process logs:
  a run whose first epoch had no validation wrote a header with `val_` of
  every key (`val_learning_rate` too), and a resumed process whose first
  epoch had validation then wrote rows of other columns under it. Here a
  process appending to a history goes on with its header's columns, and
  the first header names `val_` columns only for the evaluated metrics.
  """

  def on_train_begin(self, logs=None):
    super().on_train_begin(logs)
    if self.append and os.path.exists(self.filename):
      with open(self.filename, newline='') as file:
        header = next(csv.reader(file, delimiter=self.sep), None)
      if header and header[0] == 'epoch':
        self.keys = header[1:]

  def on_epoch_end(self, epoch, logs=None):
    if self.keys is None and logs:
      keys = sorted(logs)
      if not any(key.startswith('val_') for key in keys):
        # What an evaluation will log: the compiled metrics, not the
        # learning rate that progress.LearningRateLogger adds.
        keys = sorted(keys + [f'val_{key}' for key in keys
                              if key != 'learning_rate'])
      self.keys = keys
    super().on_epoch_end(epoch, logs)


# (earlier, later): every callback of the first type must come before every
# one of the second (module docstring).
_ORDER_RULES = (
    (StopOnDivergence, keras.callbacks.Callback),
    (BestWeightsCallback, evaluation_weights.EvaluationWeights),
    (evaluation_weights.EvaluationWeights, BackupCallback),
    (keras.callbacks.CSVLogger, BackupCallback),
    (keras.callbacks.Callback, PreemptionCallback),
)


def check_order(callbacks):
  """Raises ValueError if `callbacks` breaks a rule of the module docstring."""
  for earlier, later in _ORDER_RULES:
    for i, first in enumerate(callbacks):
      for second in callbacks[:i]:
        # `second` comes before `first`: wrong if `first` must be earlier.
        if (isinstance(first, earlier) and isinstance(second, later) and
            type(first) is not type(second)):
          raise ValueError(
              f'{type(first).__name__} must come before '
              f'{type(second).__name__} in the callbacks of fit (see '
              'keras_sft.training.callbacks).')
  return callbacks


def create(*, chief, checkpointer, workdir, config, plan, strategy,
           statistics_batches, extra=()):
  """The callbacks of one `fit` of a run, in their checked order.

  Args:
    chief: Whether this worker writes (the others take part in the
      collectives of precise BN and stop on SIGTERM without a backup).
    checkpointer: The run's `checkpoints.Checkpointer`.
    workdir: The run's `workdir.Workdir`.
    config: The run's ConfigDict.
    plan: The run's `recipe.Plan`.
    strategy: The run's `tf.distribute` strategy.
    statistics_batches: None, or a function returning the precise-BN
      batches.
    extra: The caller's callbacks (`train_and_evaluate(callbacks=...)`),
      after the run's own: they see each epoch's history row and backup
      written, so one that stops training by raising (a pruned tuning
      trial) loses nothing.

  Returns:
    `(callbacks, divergence, preemption)`: the list, and its
    `StopOnDivergence` and `PreemptionCallback` (call `uninstall()` after
    `fit`, also when it raised).
  """
  divergence = StopOnDivergence()
  preemption = PreemptionCallback(checkpointer if chief else None)
  callbacks = [divergence]
  if chief:
    callbacks.append(BestWeightsCallback(checkpointer.directory))
  callbacks.append(evaluation_weights.EvaluationWeights(
      ema=config.ema_momentum is not None,
      statistics_batches=statistics_batches, strategy=strategy))
  if chief:
    callbacks += [
        progress.LearningRateLogger(),
        progress.StepLogger(config.log_every_steps, plan.total_steps,
                            config.global_batch_size),
        HistoryLogger(workdir.history_csv, append=True),
        keras.callbacks.TensorBoard(workdir.tensorboard),
        BackupCallback(checkpointer, config.checkpoint_every_steps),
    ]
  callbacks += list(extra)
  callbacks.append(preemption)
  return check_order(callbacks), divergence, preemption
