"""Atomic backups of a training run, and resuming from them.

A backup is `ckpt-<step>.weights.h5` (model and optimizer state, as Keras'
`save_weights` writes them for a compiled model) plus `checkpoint.json`, which
lists the kept backups, newest first, with a checksum of each. Both are
written to a temporary name in a private directory, flushed to disk and
renamed, so a process killed at any moment leaves either the previous backup
or the new one, never a torn file. Only finite weights are backed up; a
resumed run takes the newest backup that verifies and names any it skips.

`callbacks.BestWeightsCallback` keeps one more file the same way,
`best.weights.h5`, the weights of the epoch with the highest val_accuracy,
for export; `best_record` reads what it scored.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings

import h5py
import keras
import numpy as np

from keras_sft import errors
from keras_sft import files

_POINTER = 'checkpoint.json'
BEST_WEIGHTS = 'best.weights.h5'
# The weights the run's final evaluation measured (EMA or raw, BN
# re-estimated) and its export holds, so an export needs no data to repeat
# them.
FINAL_WEIGHTS = 'final.weights.h5'
BEST_POINTER = 'best.json'
# HDF5 attributes of best.weights.h5 start with this.
ATTRIBUTE_PREFIX = 'keras_sft_'
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


def describe_non_finite(bad):
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


def write_weights(model, directory, name, attributes=None):
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
  files.check_free_space(directory, needed, what)
  path = os.path.join(directory, name)
  private = tempfile.mkdtemp(prefix=files.TEMPORARY_PREFIX,
                             dir=directory)
  try:
    temporary = os.path.join(private, name)
    model.save_weights(temporary, overwrite=True)
    if attributes:
      with h5py.File(temporary, 'a') as file:
        file.attrs.update(attributes)
    files.fsync_path(temporary)
    os.replace(temporary, path)
  except OSError as error:
    if files.is_disk_full(error):
      raise files.disk_full_error(directory, what) from error
    raise
  finally:
    shutil.rmtree(private, ignore_errors=True)
  # On disk before anything (a pointer, a record) names the file.
  files.fsync_directory(directory)
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
          f'Not backing up step {step}: {describe_non_finite(bad)}.')
    os.makedirs(self.directory, exist_ok=True)
    name = os.path.basename(self.backup_path(step))
    path = write_weights(model, self.directory, name)
    backup = {'file': name, 'step': step, 'sha256': _sha256(path)}
    # Older backups, but not those of steps beyond this one: a run that fell
    # back to an older backup abandons them.
    kept = [backup] + [
        older for older in self._listed()
        if older['step'] < step and
        os.path.exists(os.path.join(self.directory, older['file']))
    ][:self.keep - 1]
    files.atomic_write(self._pointer,
                       json.dumps(dict(backup, backups=kept)))
    self._prune({older['file'] for older in kept})
    return path

  def _prune(self, kept):
    files.remove_temporary_files(self.directory)
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
      return describe_non_finite(bad)
    return None


def read_json_or_none(path):
  try:
    with open(path) as file:
      return json.load(file)
  except (OSError, ValueError):
    return None


def write_final_weights(model, directory, step, weights):
  """Writes `final.weights.h5`: the weights the final evaluation measured.

  Args:
    model: The model holding them.
    directory: The run's checkpoint directory.
    step: The training step they are of.
    weights: 'ema' or 'raw'.
  """
  os.makedirs(directory, exist_ok=True)
  return write_weights(model, directory, FINAL_WEIGHTS, attributes={
      f'{ATTRIBUTE_PREFIX}step': int(step),
      f'{ATTRIBUTE_PREFIX}weights': weights})


def final_record(directory):
  """`{'step', 'weights'}` of `directory/final.weights.h5`, or None."""
  path = os.path.join(directory, FINAL_WEIGHTS)
  if not os.path.exists(path):
    return None
  try:
    with h5py.File(path, 'r') as file:
      return {'step': int(file.attrs[f'{ATTRIBUTE_PREFIX}step']),
              'weights': str(file.attrs[f'{ATTRIBUTE_PREFIX}weights'])}
  except (OSError, KeyError, ValueError):
    return None  # Damaged: the export re-derives them from the backup.


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
    record = {key[len(ATTRIBUTE_PREFIX):]: value
              for key, value in file.attrs.items()
              if key.startswith(ATTRIBUTE_PREFIX)}
  if not record:
    return read_json_or_none(os.path.join(directory, BEST_POINTER))
  return {'file': str(record['file']), 'monitor': str(record['monitor']),
          'value': float(record['value']), 'step': int(record['step'])}
