"""The workdir is the run: its layout, its config, its lock.

`Workdir(path)` is the one place that names the files of a run; every module
(and the tests) asks it for a path instead of spelling the name:

  config.json      the resolved config of the run (written on first start)
  train.log        log lines of every start of the run
  checkpoints/     atomic backups, resumed from on a rerun
  history.csv      per-epoch metrics; tensorboard/ the same for TensorBoard
  dataset.json     dataset name, class names and, for folders, a
                   fingerprint of the files (read by the export, checked
                   on every start)
  run.lock         locked by the process that runs the run (its PID, host)
  metrics.json     final evaluation, with the report of
                   keras_sft.training.evaluation
  confusion_matrix.png, curves.png   the report's pictures
  export/<n>/      SavedModels for TF Serving, versions 1, 2, ...
"""

import csv
import fcntl
import hashlib
import json
import os
import re
import socket
import time

from keras_sft import errors
from keras_sft import files

_ABSENT = '<absent>'
# Names of temporary files and folders start with this.
# A URL-like path (gs://, s3://, ram://, hdfs://, file://): one of
# tf.io.gfile's file systems, not a local path.
_SCHEME = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


class Workdir:
  """The paths of one run directory; creating it writes nothing.

  Args:
    path: The run directory.

  Raises:
    ConfigError: `path` is empty.
    WorkdirError: `path` is not a local folder and cannot become one (see
      `check_local_folder`).
  """

  def __init__(self, path):
    if not path:
      raise errors.ConfigError(f'workdir must be a directory path. Received: '
                               f'workdir={path!r}')
    self.path = os.fspath(path)
    check_local_folder('workdir', self.path)

  def __repr__(self):
    return f'Workdir({self.path!r})'

  def _join(self, *names):
    return os.path.join(self.path, *names)

  @property
  def config_file(self):
    return self._join('config.json')

  @property
  def log_file(self):
    return self._join('train.log')

  @property
  def checkpoints(self):
    return self._join('checkpoints')

  @property
  def history_csv(self):
    return self._join('history.csv')

  @property
  def tensorboard(self):
    return self._join('tensorboard')

  @property
  def dataset_file(self):
    return self._join('dataset.json')

  @property
  def lock_file(self):
    return self._join('run.lock')

  @property
  def metrics_file(self):
    return self._join('metrics.json')

  @property
  def confusion_matrix_png(self):
    return self._join('confusion_matrix.png')

  @property
  def curves_png(self):
    return self._join('curves.png')

  @property
  def reliability_png(self):
    return self._join('reliability.png')

  @property
  def calibration_file(self):
    return self._join('calibration.json')

  @property
  def export(self):
    return self._join('export')

  def truncate_history(self, epochs):
    """Keeps only the rows of epochs before `epochs` in history.csv.

    A resumed run trains those epochs again (the rest of an interrupted
    one, or more after falling back to an older backup), and Keras'
    CSVLogger appends their rows anew.
    """
    if not os.path.exists(self.history_csv):
      return
    with open(self.history_csv, newline='') as file:
      lines = file.read().splitlines(keepends=True)
    if not lines:
      return
    header = next(csv.reader(lines[:1]))
    column = header.index('epoch') if 'epoch' in header else 0
    kept = lines[:1] + [
        line for line in lines[1:]
        if _epoch_of(line, column) is not None and
        _epoch_of(line, column) < epochs]
    if kept != lines:
      files.atomic_write(self.history_csv, ''.join(kept))

  def remove_temporary_files(self):
    """Removes the temporary files and folders of killed writers.

    Only the run's own processes write here, so call it holding the lock:
    the run directory, `checkpoints/` and `export/` (an interrupted export).

    Returns:
      The removed paths.
    """
    return [path for directory in (self.path, self.checkpoints, self.export)
            for path in files.remove_temporary_files(directory)]

  def has_run(self):
    """Whether a run has claimed this directory (its config is written)."""
    return os.path.exists(self.config_file)

  def read_config(self):
    """The run's config as a dict (from config.json).

    Keys of `KEYS_ADDED_LATER` that the run predates are filled in with the
    value that reproduces its behaviour.

    Raises:
      PathNotFoundError: no run has claimed this directory.
    """
    if not self.has_run():
      raise errors.PathNotFoundError(
          f'{self.config_file} does not exist: workdir={self.path!r} holds no '
          'keras_sft run. Train first: python -m keras_sft.main '
          f'--config=CONFIG --workdir={self.path}')
    return with_keys_added_later(files.read_json_object(self.config_file))

  def lock(self):
    """Takes the run's exclusive lock; use as a context manager to release.

    One process runs a workdir at a time: the lock (`flock` on `run.lock`)
    is held until released or until the process ends, however it ends. The
    file names the holder for the error of the next process.

    Returns:
      A `Lock`, already held.

    Raises:
      WorkdirError: another process holds it.
    """
    return Lock(self.lock_file)

  def claim(self, config, write=True, dataset=None, legacy_files=None):
    """Creates the directory for `config`, or checks it holds this run.

    Args:
      config: The resolved ConfigDict (or dict).
      write: False on the workers of a multi-worker run other than the
        chief: they check the config the chief wrote, if any, and write
        nothing.
      dataset: None, or the dataset's identity, a JSON-safe dict with
        `class_names` (and, for folders, `files`: `fingerprint_files`),
        recorded in dataset.json on each claim and compared with the
        record of the previous one.
      legacy_files: None, or a function returning the data's
        `legacy_fingerprint_files`: a dataset.json written before
        `FINGERPRINT_VERSION` is checked against it, and rewritten with
        `dataset` when it matches.

    Raises:
      WorkdirError: the directory holds a run with a different config, or
        of a dataset with other class names or files.
    """
    current = config_to_dict(config)
    if self.has_run():
      previous = with_keys_added_later(files.read_json_object(self.config_file),
                                       current)
      if previous != current:
        raise errors.WorkdirError(
            f'workdir={self.path!r} holds another run; its config differs '
            f'in: {_differences(previous, current)}. Use a new --workdir, or '
            'rerun with the same config to resume.')
      if dataset is not None and os.path.exists(self.dataset_file):
        self._check_dataset(files.read_json_object(self.dataset_file), dataset,
                            legacy_files)
    if write:
      os.makedirs(self.path, exist_ok=True)
      if not self.has_run():
        files.write_json(self.config_file, current)
      if dataset is not None:
        files.write_json(self.dataset_file, dataset)

  def _check_dataset(self, recorded, current, legacy_files=None):
    files = recorded.get('files')
    if (legacy_files is not None and 'files' in current and
        isinstance(files, dict) and 'version' not in files):
      # Recorded by an older keras-sft: compared as it was computed then.
      current = {**current, 'files': legacy_files()}
    changed = [key for key in ('class_names', 'files', 'pseudo_labels')
               if key in recorded and key in current and
               recorded[key] != current[key]]
    if changed:
      differences = _differences({key: recorded[key] for key in changed},
                                 {key: current[key] for key in changed})
      if 'pseudo_labels' in changed:
        reason = ('The pseudo-label file this student trains on changed '
                  '(pseudo_labels is its SHA-256). Restore it, or delete the '
                  "student's run (for the last round: all in the workdir but "
                  'self_training/) and rerun: it trains again on the file '
                  'as it is.')
      else:
        reason = ('A renamed class folder would shift the labels, and '
                  'changed files change the batches. Restore the data the '
                  'run started with, or use a new --workdir.')
      raise errors.WorkdirError(
          f'workdir={self.path!r} holds a run of other data: {differences} '
          f'(from {self.dataset_file}). {reason}')


def check_local_folder(name, path):
  """Raises unless `path` is a local folder, or a path where one can be made.

  The workdir's lock (`flock`), atomic writes (write, fsync, rename) and
  free-space checks are local-file APIs, so object storage (gs://, and any
  other tf.io.gfile scheme) is refused with the route that works, rather
  than creating a local folder named `gs:` or failing half way through.

  Args:
    name: The flag or argument, for the message (`workdir`, `export_base`).
    path: Its value.

  Raises:
    WorkdirError: `path` names a file system other than the local one, or
      it (or a folder above it) exists and is not a folder.
  """
  if _SCHEME.match(path):
    raise errors.WorkdirError(
        f'{name}={path!r} is not on a local file system: the run\'s lock, '
        'atomic backups and exports need one (flock, rename), which object '
        'storage does not give. Train on a local disk (on a Cloud TPU VM: '
        f'its boot or a mounted persistent disk, e.g. --{name}=/tmp/runs/c10), '
        'then copy the run or its export to the bucket: gsutil -m cp -r '
        '/tmp/runs/c10/export gs://BUCKET/runs/c10/.')
  existing = os.path.abspath(path)
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = ('it' if existing == os.path.abspath(path) else
             f'{existing!r}, above it,')
    raise errors.WorkdirError(
        f'{name}={path!r} is not a folder: {where} exists and is not a folder '
        '(a file, or a broken link). Give a folder path (a new one is '
        'created), or move that file away.')


class Lock:
  """An exclusive `flock` on a file that names its holder.

  Args:
    path: The lock file; created if missing, never followed if a symlink.

  Raises:
    WorkdirError: another process holds it.
  """

  def __init__(self, path):
    self.path = path
    self._descriptor = os.open(
        path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(self._descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(self._descriptor, 4096).decode('utf-8', 'replace')
      os.close(self._descriptor)
      raise errors.WorkdirError(
          f'{os.path.dirname(path)!r} is in use by another process '
          f'({holder.strip() or "its PID is not written yet"}): one run per '
          'workdir. Wait for it to end, or stop it; or use another '
          '--workdir.') from None
    os.ftruncate(self._descriptor, 0)
    os.pwrite(self._descriptor,
              f'PID {os.getpid()} on host {socket.gethostname()}, since '
              f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n'.encode(), 0)

  def release(self):
    """Releases the lock (also done by the OS when the process ends)."""
    if self._descriptor is not None:
      fcntl.flock(self._descriptor, fcntl.LOCK_UN)
      os.close(self._descriptor)
      self._descriptor = None

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.release()


# The version of the `files` fingerprint in dataset.json (`fingerprint_files`).
# Records without one hold the legacy fingerprint of runs started before it:
# every file under the folder (`legacy_fingerprint_files`), so a README
# added to the data folder refused the resume.
FINGERPRINT_VERSION = 2


def fingerprint_files(root, paths):
  """The identity of the files a run reads: their paths and sizes.

  Args:
    root: The data folder; paths are recorded relative to it.
    paths: The files read (those the reader lists for the run's splits),
      in any order; repeated ones count once.

  Returns:
    `{'count': number of files, 'sha256': hex digest of the sorted
    (relative path, size) list, 'version': FINGERPRINT_VERSION}`.
  """
  entries = {_fingerprint_entry(root, path) for path in paths}
  digest = hashlib.sha256(''.join(sorted(entries)).encode('utf-8', 'replace'))
  return {'count': len(entries), 'sha256': digest.hexdigest(),
          'version': FINGERPRINT_VERSION}


def legacy_fingerprint_files(root):
  """The fingerprint runs recorded before `FINGERPRINT_VERSION`: every file.

  Every file under `root`, images or not, read or not. Symbolic links to
  folders are not followed (no loops); linked files count with the size of
  their target. Kept to check the resume of those runs.

  Returns:
    `{'count': number of files, 'sha256': hex digest of the sorted
    (relative path, size) list}`.
  """
  entries = []
  for directory, folders, file_names in os.walk(root):
    folders.sort()
    for name in file_names:
      entries.append(_fingerprint_entry(root, os.path.join(directory, name)))
  digest = hashlib.sha256(''.join(sorted(entries)).encode('utf-8', 'replace'))
  return {'count': len(entries), 'sha256': digest.hexdigest()}


def _fingerprint_entry(root, path):
  try:
    size = os.stat(path).st_size
  except OSError:
    size = -1  # A broken link.
  return f'{os.path.relpath(path, root)}\0{size}\n'


def _epoch_of(line, column):
  try:
    return int(next(csv.reader([line]))[column])
  except (ValueError, IndexError, StopIteration):
    return None  # A torn last line.


def _flatten(tree, prefix=''):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


# Config keys added after runs were started without them: the value that
# gives such a run's behaviour. A run started before a key existed resumes
# under a newer keras-sft when the key has this value now; otherwise the
# difference is named like any other.
KEYS_ADDED_LATER = {
    # Added together (one release): step logs and the image pixel limit
    # change no trained weight; BN momentum None was the layers' own; the
    # runs before precise BN had none.
    'log_every_steps': 100,
    'max_image_pixels': 40_000_000,
    'batch_norm_momentum': None,
    'precise_bn_batches': 0,
    # Training images were always randomly cropped and flipped.
    'random_crop': True,
    'random_flip': True,
    # Runs were all ResNet50 before other backbones.
    'model': 'resnet50',
    # Only read by the litert_int8 export, which came with it.
    'export_representative_images': 200,
    # Added together: L2 toward zero, no clipping, no accumulation,
    # one learning rate for all variables.
    'weight_decay_target': 'zero',
    'clip_global_norm': None,
    'gradient_accumulation_steps': 1,
    'layer_decay': None,
    # Runs before temperature scaling served softmax(logits) (T = 1).
    'calibration_split': None,
    # Runs before them trained on every example, unweighted, once per epoch.
    'class_weight': None,
    'sampling': 'shuffle',
    'random_erasing_probability': 0.0,
    # Runs were all supervised before semi-supervised training; the
    # FixMatch keys are unread when it is off.
    'unlabeled': None,
    'semi_supervised': None,
    'fixmatch_mu': 7,
    'fixmatch_threshold': 0.95,
    'fixmatch_unlabeled_weight': 1.0,
    'fixmatch_randaugment_num_ops': 2,
    'fixmatch_randaugment_magnitude': 0.5,
    'fixmatch_cutout_fraction': 0.5,
    'self_training_threshold': 0.5,
    'self_training_fraction': 0.5,
    'self_training_rounds': 1,
    'self_training_epochs': None,
    # Any value gives an older run's behaviour: runs before these keys did
    # not self-train.
    'self_training_student_init': 'teacher',
    'self_training_randaugment_num_ops': 0,
    'self_training_randaugment_magnitude': 0.5,
}


def with_keys_added_later(previous, current=None):
  """`previous` (a stored config) with the keys it predates filled in.

  The keys of `KEYS_ADDED_LATER` that `previous` lacks (and `current`, a
  config to compare with, has) are added, with the value that reproduces
  the older behaviour.
  """
  missing = {key: value for key, value in KEYS_ADDED_LATER.items()
             if key not in previous and (current is None or key in current)}
  return {**previous, **missing}


def _differences(previous, current):
  old, new = _flatten(previous), _flatten(current)
  return '; '.join(
      f'{key}: {old.get(key, _ABSENT)!r} in the workdir, '
      f'{new.get(key, _ABSENT)!r} now'
      for key in sorted(set(old) | set(new))
      if old.get(key, _ABSENT) != new.get(key, _ABSENT))


def config_to_dict(config):
  """Returns a JSON-safe dict of a ConfigDict (or dict)."""
  as_dict = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  return json.loads(json.dumps(as_dict, default=str))
