"""Files written so that no crash, kill or full disk leaves a torn one.

`atomic_write` (and `write_json`) write through a flushed temporary file
renamed into place, then sync the directory; `remove_temporary_files` clears
what a killed writer left; `check_free_space` and `disk_full_error` turn a
full disk into a `WorkdirError` naming the file; `read_json` reads strictly
(a bare NaN never passes).
"""

import errno
import json
import logging
import math
import os
import shutil
import tempfile

from keras_sft import errors

# Temporary files and folders start with this (and end in a random part).
TEMPORARY_PREFIX = '.tmp-'


def atomic_write(path, data):
  """Writes `data` (str or bytes) to `path` via a flushed temporary file.

  A process killed at any moment leaves the old file or the new one, never
  a torn one; the directory is synced after the rename, so the new file is
  on disk when this returns. The temporary file is created with `O_EXCL`
  and `O_NOFOLLOW` under a random name (`mkstemp`), so a link planted in
  the directory cannot redirect the write.
  """
  directory = os.path.dirname(os.path.abspath(path))
  descriptor, temporary = tempfile.mkstemp(
      prefix=f'{TEMPORARY_PREFIX}{os.path.basename(path)}.', dir=directory)
  try:
    os.fchmod(descriptor, 0o666 & ~_umask())  # Not mkstemp's private 0600.
    with os.fdopen(descriptor, 'wb') as file:
      file.write(data.encode() if isinstance(data, str) else data)
      file.flush()
      os.fsync(file.fileno())
    os.replace(temporary, path)
  except BaseException:
    if os.path.lexists(temporary):
      os.remove(temporary)
    raise
  fsync_directory(directory)


def _umask():
  try:
    with open('/proc/self/status') as status:
      for line in status:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except OSError:
    pass
  return 0o022


def _is_temporary(name):
  return (name.startswith(TEMPORARY_PREFIX) or name.endswith('.tmp') or
          name.startswith('tmp-'))  # The last two: older versions' names.


def remove_temporary_files(directory):
  """Removes what killed writers left in `directory`; returns the paths."""
  removed = []
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    return removed
  for name in names:
    if not _is_temporary(name):
      continue
    path = os.path.join(directory, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      os.remove(path)
    removed.append(path)
  return removed


def check_free_space(directory, needed_bytes, what):
  """Raises `WorkdirError` unless `directory`'s disk has `needed_bytes` free.

  Args:
    directory: An existing directory.
    needed_bytes: The free space required.
    what: What is about to be written, for the message ('a backup').
  """
  free = shutil.disk_usage(directory).free
  if free < needed_bytes:
    raise disk_full_error(directory, what, free, needed_bytes)


def disk_full_error(directory, what, free=None, needed_bytes=None):
  """The `WorkdirError` of a disk too full to write `what` in `directory`."""
  amounts = ''
  if free is not None:
    amounts = (f': {free / 2**20:.0f} MiB free, '
               f'{needed_bytes / 2**20:.0f} MiB needed')
  return errors.WorkdirError(
      f'Not enough free space in {directory} to write {what}{amounts}. Free '
      'some space, or move the workdir to a larger disk, then rerun the '
      'same command to resume.')


# Why a write failed for lack of space or size, as Python's OSError (errno)
# or TensorFlow's errors (message) say it.
WRITE_FAILURES = {errno.ENOSPC: 'No space left on device',
                  errno.EDQUOT: 'Disk quota exceeded',
                  errno.EFBIG: 'File too large'}


def write_failure(error):
  """The reason in `WRITE_FAILURES` that `error` failed a write, or None."""
  if isinstance(error, OSError) and error.errno in WRITE_FAILURES:
    return WRITE_FAILURES[error.errno]
  return next((reason for reason in WRITE_FAILURES.values()
               if reason in str(error)), None)


def is_disk_full(error):
  """Whether `error` (an OSError, or TF's on a failed write) is ENOSPC."""
  return write_failure(error) in (WRITE_FAILURES[errno.ENOSPC],
                                  WRITE_FAILURES[errno.EDQUOT])


def fsync_path(path, flags=os.O_NOFOLLOW):
  """Flushes file `path` (or, with `os.O_DIRECTORY`, a directory's entries)."""
  descriptor = os.open(path, os.O_RDONLY | flags)
  try:
    os.fsync(descriptor)
  finally:
    os.close(descriptor)


def fsync_directory(path):
  """Flushes the entries of directory `path` (renames, new files) to disk."""
  fsync_path(path, os.O_DIRECTORY)


def write_json(path, value):
  """Atomically writes `value` as indented JSON with sorted keys.

  NaN and ±inf, which JSON does not have, are written as null, with a
  warning that names them.
  """
  non_finite = []
  value = _finite_or_none(value, '', non_finite)
  if non_finite:
    logging.warning('%s: non-finite numbers written as null: %s', path,
                    ', '.join(non_finite))
  atomic_write(path, json.dumps(value, indent=2, sort_keys=True,
                                allow_nan=False))


def _finite_or_none(value, name, non_finite):
  if isinstance(value, float) and not math.isfinite(value):
    non_finite.append(f'{name}={value}')
    return None
  if isinstance(value, dict):
    return {key: _finite_or_none(item, f'{name}.{key}' if name else str(key),
                                 non_finite)
            for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_none(item, f'{name}[{index}]', non_finite)
            for index, item in enumerate(value)]
  return value


def read_json(path):
  """Reads a JSON file, naming the file when it is not valid JSON."""
  with open(path) as file:
    text = file.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as error:
    raise errors.DataError(
        f'{path} is not valid JSON ({error}); it may have been truncated. '
        'Restore it or delete it.') from error


def read_json_object(path):
  """`read_json` of a file that must hold a JSON object (a dict)."""
  value = read_json(path)
  if not isinstance(value, dict):
    raise errors.DataError(
        f'{path} holds {type(value).__name__} {str(value)[:40]!r}, not a JSON '
        'object: it was damaged. Restore it or delete it.')
  return value
