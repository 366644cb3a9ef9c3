"""Atomic backups of a training run, and resuming from them.

A backup is `ckpt-<step>.weights.h5` (model and optimizer state, as Keras'
`save_weights` writes them for a compiled model) plus `checkpoint.json`, which
lists the kept backups, newest first, with a checksum of each. Both are
written to a temporary name in a private directory, flushed to disk and
renamed, so a process killed at any moment leaves either the previous backup
or the new one, never a torn file. Only finite weights are backed up; a
resumed run takes the newest backup that verifies and names any it skips.

`BestWeightsCallback` keeps one more file the same way, `best.weights.h5`,
the weights of the epoch with the highest val_accuracy, for export.
"""

import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import warnings

import h5py
import keras
import numpy as np

from keras_sft import errors
from keras_sft import workdir as workdir_lib

_POINTER = 'checkpoint.json'
BEST_WEIGHTS = 'best.weights.h5'
_BEST_POINTER = 'best.json'
# HDF5 attributes of best.weights.h5 start with this.
_ATTRIBUTE_PREFIX = 'keras_sft_'
_PATTERN = re.compile(r'^ckpt-(\d+)\.weights\.h5$')


def check_config(config):
  """Checks the backup keys of the config."""
  errors.check_positive('checkpoint_every_steps', config.checkpoint_every_steps)
  errors.check_positive('keep_checkpoints', config.keep_checkpoints)


def trained_steps(model):
  """Training steps taken so far: the position of the input stream.

  The `Classifier`'s `step_counter`: every train step advances it, also one
  whose update the optimizer skipped (a loss-scale overflow), and every
  backup holds it. For other Keras models, the optimizer's step.
  """
  counter = getattr(model, 'step_counter', None)
  if counter is None:
    counter = model.optimizer.iterations
  return int(keras.ops.convert_to_numpy(counter))


def non_finite_variables(model):
  """Paths of the float variables (model and optimizer) holding NaN or ±inf.

  Empty when every value is finite.
  """
  variables = list(model.weights)
  if getattr(model, 'optimizer', None) is not None:
    variables += list(model.optimizer.variables)
  bad, seen = [], set()
  for variable in variables:
    if id(variable) in seen or 'float' not in str(variable.dtype):
      continue
    seen.add(id(variable))
    if not np.isfinite(keras.ops.convert_to_numpy(variable)).all():
      bad.append(variable.path)
  return bad


def _describe_non_finite(bad):
  shown = ', '.join(bad[:3]) + (f' and {len(bad) - 3} more' if len(bad) > 3
                               else '')
  return f'{len(bad)} variable(s) not finite (NaN or inf): {shown}'


def weights_size(model, optimizer=False):
  """Bytes of the model's weights (and its optimizer's variables)."""
  variables = list(model.weights)
  if optimizer and getattr(model, 'optimizer', None) is not None:
    variables += list(model.optimizer.variables)
  return sum(int(np.prod(variable.shape)) *
             np.dtype(keras.backend.standardize_dtype(variable.dtype)).itemsize
             for variable in variables)


def _write_weights(model, directory, name, attributes=None):
  """Writes `model.save_weights` to `directory/name` atomically and durably.

  The file is written in a fresh private directory (`mkdtemp`, mode 0700)
  inside `directory`, so no link planted at a temporary name can redirect
  the write, then renamed into place; free space is checked first.

  Args:
    model: The model to save.
    directory: An existing directory.
    name: The file name, ending in `.weights.h5`.
    attributes: Optional dict stored as HDF5 attributes of the file's root,
      written before the rename, so they describe exactly these weights.

  Returns:
    The path of the file.

  Raises:
    WorkdirError: the disk is (nearly) full; nothing is left behind.
  """
  what = f'{name} (twice its size is kept free)'
  needed = 2 * weights_size(model, optimizer=True)
  workdir_lib.check_free_space(directory, needed, what)
  path = os.path.join(directory, name)
  private = tempfile.mkdtemp(prefix=workdir_lib.TEMPORARY_PREFIX,
                             dir=directory)
  try:
    temporary = os.path.join(private, name)
    model.save_weights(temporary, overwrite=True)
    if attributes:
      with h5py.File(temporary, 'a') as file:
        file.attrs.update(attributes)
    workdir_lib.fsync_path(temporary)
    os.replace(temporary, path)
  except OSError as error:
    if workdir_lib.is_disk_full(error):
      raise workdir_lib.disk_full_error(directory, what) from error
    raise
  finally:
    shutil.rmtree(private, ignore_errors=True)
  # On disk before anything (a pointer, a record) names the file.
  workdir_lib.fsync_directory(directory)
  return path


def _sha256(path):
  digest = hashlib.sha256()
  with open(path, 'rb') as file:
    for block in iter(lambda: file.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def load_weights(model, path):
  """`model.load_weights(path)`, refusing a backup of another layout.

  Keras only warns when a saved optimizer's variables do not match; a
  resumed run must not go on silently without its optimizer state.

  Raises:
    WorkdirError: the file does not load into `model` (another layout, or
      not a readable weights file).
  """
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      model.load_weights(path)
  except OSError as error:  # h5py: truncated, or not HDF5 at all.
    raise errors.WorkdirError(
        f'{path} cannot be read ({error}): the file is damaged.') from error
  except (ValueError, KeyError) as error:
    raise errors.WorkdirError(
        f'{path} does not load into this run\'s model: {error}. A backup '
        'written by a keras-sft version without the step counter, or for '
        'another model, cannot be resumed: finish that run with the version '
        'that wrote it, or start over in a new --workdir.') from error
  for warning in caught:
    if 'Skipping variable loading' in str(warning.message):
      raise errors.WorkdirError(
          f'{path} does not load into this run\'s model: '
          f'{warning.message}. Start over in a new --workdir.')
    warnings.warn_explicit(warning.message, warning.category,
                           warning.filename, warning.lineno)


class Checkpointer:
  """Saves and restores backups in one directory.

  `checkpoint.json` lists the kept backups, newest first, each with its step
  and the sha256 of its file. `restore` takes the newest one that verifies
  (checksum, loads, step, finite values) and names each one it skips, as
  Keras' `BackupAndRestore(double_checkpoint=True)` falls back; a pointer
  that is not valid JSON is replaced by the backups found on disk.

  Args:
    directory: Where the backups live; created on the first save.
    keep: How many of the newest backups to keep (>= 2 to fall back).
  """

  def __init__(self, directory, keep=2):
    if keep < 1:
      raise ValueError(f'keep must be >= 1. Received: keep={keep}')
    self.directory = directory
    self.keep = keep

  @property
  def _pointer(self):
    return os.path.join(self.directory, _POINTER)

  def _listed(self):
    """The backups, newest first: dicts with `file`, `step`, `sha256`."""
    if not os.path.exists(self._pointer):
      return []
    try:
      with open(self._pointer) as file:
        state = json.load(file)
      backups = state.get('backups') or [
          {'file': state['file'], 'step': state['step']}]  # Older pointers.
      for backup in backups:
        if (not _PATTERN.match(backup['file']) or
            not isinstance(backup['step'], int)):
          raise ValueError(f'not a backup: {backup!r}')
      return backups
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
      logging.warning('%s is unreadable (%s); using the backups found in %s.',
                      self._pointer, error, self.directory)
      return self._scan()

  def _scan(self):
    found = [(int(match.group(1)), name)
             for name in os.listdir(self.directory)
             for match in [_PATTERN.match(name)] if match]
    return [{'file': name, 'step': step}
            for step, name in sorted(found, reverse=True)]

  def latest(self):
    """Returns `(path, step)` of the newest backup (unverified), or None.

    Raises:
      PathNotFoundError: the pointer lists backups, but none exists.
    """
    backups = self._listed()
    if not backups:
      return None
    for backup in backups:
      path = os.path.join(self.directory, backup['file'])
      if os.path.exists(path):
        return path, backup['step']
    raise errors.PathNotFoundError(
        f'{self._pointer} names {", ".join(b["file"] for b in backups)}, '
        f'which are missing. Restore them, or delete {self.directory} to '
        'start the run over.')

  def backup_path(self, step):
    """The path of the backup of `step` (which may not exist)."""
    return os.path.join(self.directory, f'ckpt-{step}.weights.h5')

  def save(self, model, step):
    """Writes a backup of `model` (and its optimizer) at `step`.

    Raises:
      DivergedError: a variable is not finite; nothing is written.
      WorkdirError: the disk is (nearly) full; nothing is written.
    """
    bad = non_finite_variables(model)
    if bad:
      raise errors.DivergedError(
          f'Not backing up step {step}: {_describe_non_finite(bad)}.')
    os.makedirs(self.directory, exist_ok=True)
    name = os.path.basename(self.backup_path(step))
    path = _write_weights(model, self.directory, name)
    backup = {'file': name, 'step': step, 'sha256': _sha256(path)}
    # Older backups, but not those of steps beyond this one: a run that fell
    # back to an older backup abandons them.
    kept = [backup] + [
        older for older in self._listed()
        if older['step'] < step and
        os.path.exists(os.path.join(self.directory, older['file']))
    ][:self.keep - 1]
    workdir_lib.atomic_write(self._pointer,
                             json.dumps(dict(backup, backups=kept)))
    self._prune({older['file'] for older in kept})
    return path

  def _prune(self, kept):
    workdir_lib.remove_temporary_files(self.directory)
    for name in os.listdir(self.directory):
      if _PATTERN.match(name) and name not in kept:
        os.remove(os.path.join(self.directory, name))

  def restore(self, model):
    """Loads the newest usable backup into `model`; returns its step, or 0.

    Raises:
      WorkdirError: backups exist, but none can be resumed (each named).
    """
    backups = self._listed()
    if not backups:
      return 0
    if getattr(model, 'optimizer', None) is None:
      raise ValueError('Compile the model before restoring a backup: the '
                       'backup holds optimizer state too.')
    # The optimizer's slots must exist before its state can be loaded.
    if not model.optimizer.built:
      model.optimizer.build(model.trainable_variables)
    skipped = []
    for backup in backups:
      path = os.path.join(self.directory, backup['file'])
      problem = self._load_verified(model, path, backup)
      if problem is None:
        if skipped:
          logging.warning('Resumed from the older backup %s (step %d) '
                          'instead.', path, backup['step'])
        logging.info('Resumed from %s at step %d.', path, backup['step'])
        return backup['step']
      logging.warning('Backup %s cannot be resumed: %s. Trying the one '
                      'before it.', path, problem)
      skipped.append(f'{backup["file"]}: {problem}')
    raise errors.WorkdirError(
        f'No backup in {self.directory} can be resumed: '
        f'{"; ".join(skipped)}. Restore one, or delete {self.directory} (or '
        'use a new --workdir) to start over.')

  @staticmethod
  def _load_verified(model, path, backup):
    """Loads `path` into `model`; returns None, or what is wrong with it."""
    if not os.path.exists(path):
      return 'the file is missing'
    if backup.get('sha256') and _sha256(path) != backup['sha256']:
      return ('its sha256 differs from the one recorded when it was written '
              '(the file was damaged or changed since)')
    try:
      load_weights(model, path)
    except errors.WorkdirError as error:
      return str(error)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
      return f'it cannot be read ({type(error).__name__}: {error})'
    restored = trained_steps(model)
    if restored != backup['step']:
      return (f'{path} holds step {restored}, but {_POINTER} says '
              f'{backup["step"]}: the backup does not match its pointer')
    bad = non_finite_variables(model)
    if bad:
      return _describe_non_finite(bad)
    return None


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
    return trained_steps(self.model)

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
    bad = non_finite_variables(self.model)
    if bad:
      logging.warning('No backup at step %d: %s.', step,
                      _describe_non_finite(bad))
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
    self.reason = f'{reason} at step {trained_steps(self.model)}'
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
    bad = non_finite_variables(self.model)
    if bad:
      self._stop(_describe_non_finite(bad))


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
    step = trained_steps(self.model)
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
    step = trained_steps(self.model)
    where = 'no backup (this worker writes none)'
    if self.checkpointer is not None:
      latest = self.checkpointer.latest()
      if latest is not None and latest[1] == step:
        where = f'its backup {latest[0]}'
      elif non_finite_variables(self.model):
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
    record = best_record(self.directory)
    self._best = None if record is None else record['value']
    pointer = os.path.join(self.directory, _BEST_POINTER)
    if record is not None and (not os.path.exists(pointer) or
                               _read_json_or_none(pointer) != record):
      # Killed between the weights and their record: repair the record.
      workdir_lib.atomic_write(pointer, json.dumps(record))

  def on_epoch_end(self, epoch, logs=None):
    value = (logs or {}).get(self.monitor)
    # A stopped run diverged (`StopOnDivergence`): its accuracy can be
    # finite while its loss and outputs are NaN.
    if (value is None or not math.isfinite(float(value)) or
        self.model.stop_training):
      return
    if self._best is not None and float(value) <= self._best:
      return
    bad = non_finite_variables(self.model)
    if bad:
      logging.warning('%s not replaced: %s.', BEST_WEIGHTS,
                      _describe_non_finite(bad))
      return
    os.makedirs(self.directory, exist_ok=True)
    record = {'file': BEST_WEIGHTS, 'monitor': self.monitor,
              'value': float(value), 'step': trained_steps(self.model)}
    _write_weights(self.model, self.directory, BEST_WEIGHTS,
                   attributes={f'{_ATTRIBUTE_PREFIX}{key}': item
                               for key, item in record.items()})
    self._best = float(value)
    workdir_lib.atomic_write(os.path.join(self.directory, _BEST_POINTER),
                             json.dumps(record))


def _read_json_or_none(path):
  try:
    with open(path) as file:
      return json.load(file)
  except (OSError, ValueError):
    return None


def best_record(directory):
  """What `directory/best.weights.h5` scored, or None if there is none.

  Returns:
    None, or a dict with `file`, `monitor`, `value` and `step`, read from
    the file itself (from `best.json` for files written before the record
    was stored inside).
  """
  path = os.path.join(directory, BEST_WEIGHTS)
  if not os.path.exists(path):
    return None
  with h5py.File(path, 'r') as file:
    record = {key[len(_ATTRIBUTE_PREFIX):]: value
              for key, value in file.attrs.items()
              if key.startswith(_ATTRIBUTE_PREFIX)}
  if not record:
    return _read_json_or_none(os.path.join(directory, _BEST_POINTER))
  return {'file': str(record['file']), 'monitor': str(record['monitor']),
          'value': float(record['value']), 'step': int(record['step'])}
