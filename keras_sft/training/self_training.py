"""Self-training: `config.semi_supervised='self_training'`.

A teacher is trained on the labelled images alone (an ordinary run of the
same config); it labels the unlabelled images (`config.unlabeled`); the most
confident of its predictions, class-balanced, join the labelled images, and
a student is trained on both (Noisy Student, Xie et al. 2020: the student
sees the training augmentation, the teacher's predictions do not), from the
teacher's network (`self_training_student_init='teacher'`, the default) or
from the same starting weights as the teacher (`'pretrained'`). With
`self_training_rounds` > 1 each student is the next round's teacher.

The stages live in the workdir, each resumable on its own:

    WORKDIR/self_training/teacher/          the teacher: an ordinary run
    WORKDIR/self_training/pseudo_labels_<k>.json  round k's labels (atomic)
    WORKDIR/self_training/student_<k>/      round k's student, k < rounds
    WORKDIR/                                the last student: the run itself

so a rerun of the same command after a kill goes on where it stopped: a
finished stage is not redone. The last student's metrics.json holds the
teacher's accuracy and each round's pseudo-label counts under
`self_training`; its export is the run's export.

Selection, per class c: the unlabelled images the teacher predicts as c
with confidence (softmax probability) ≥ `self_training_threshold`, the most
confident first, at most ⌈`self_training_fraction` · U / C⌉ of them (U
unlabelled images, C classes: the share of a class if the images were
balanced). The cap keeps a class the teacher over-predicts from crowding out
the others.
"""

import dataclasses
import hashlib
import math
import os
import time

from absl import logging
import numpy as np

from keras_sft import default_config
from keras_sft import errors
from keras_sft import files
from keras_sft.data import batch_augment
from keras_sft.data import unlabeled
from keras_sft.training import distribution
from keras_sft import workdir as workdir_lib

NAME = 'self_training'
# Where a student starts: the run's starting weights (`config.weights`,
# Noisy Student's fresh student) or its teacher's network.
STUDENT_INITS = ('pretrained', 'teacher')
# Keys the stages check themselves, not the claim of `self_training/`: a
# round's pseudo-label file records its threshold and cap (made again when
# they changed and its student has not started), a student's config holds
# all four (its own claim refuses a change once it started).
LABELLING_KEYS = ('self_training_threshold', 'self_training_fraction')
STAGE_KEYS = LABELLING_KEYS + ('self_training_epochs',
                               'self_training_student_init',
                               'self_training_randaugment_num_ops',
                               'self_training_randaugment_magnitude')
# More rounds than this have not been reported to help (Noisy Student: 3).
MAX_ROUNDS = 10


def check_config(config):
  """Checks the self-training keys (even when it is off); reads no data."""
  threshold = config.self_training_threshold
  if not (errors.is_number(threshold) and 0 <= threshold < 1):
    raise errors.ConfigError(
        'self_training_threshold must be in [0, 1): a softmax confidence '
        'below which a prediction is not used (0: every prediction may be). '
        f'Received: self_training_threshold={threshold!r}')
  errors.check_fraction('self_training_fraction',
                        config.self_training_fraction, upper_inclusive=True)
  if config.self_training_fraction == 0:
    raise errors.ConfigError(
        'self_training_fraction must be in (0, 1]: the share of each '
        "class's unlabelled images a round may label (0 labels none). "
        'Received: self_training_fraction=0')
  errors.check_integer('self_training_rounds', config.self_training_rounds,
                       1, ' (teacher -> student rounds)')
  errors.check_at_most('self_training_rounds', config.self_training_rounds,
                       MAX_ROUNDS, 'train that many networks one after '
                       'another (Noisy Student used 3)')
  errors.check_choice('self_training_student_init',
                      config.self_training_student_init, STUDENT_INITS)
  if config.self_training_epochs is not None:
    errors.check_integer('self_training_epochs', config.self_training_epochs,
                         1, ' (epochs of each student)')
  errors.check_integer('self_training_randaugment_num_ops',
                       config.self_training_randaugment_num_ops, 0,
                       ' (RandAugment operations per student batch; 0: off)')
  errors.check_at_most('self_training_randaugment_num_ops',
                       config.self_training_randaugment_num_ops,
                       batch_augment.MAX_RANDAUGMENT_NUM_OPS,
                       'apply that many operations to one image')
  errors.check_fraction('self_training_randaugment_magnitude',
                        config.self_training_randaugment_magnitude,
                        upper_inclusive=True)


@dataclasses.dataclass(frozen=True)
class Stages:
  """Where a self-training run keeps its stages."""
  workdir: str

  @property
  def directory(self):
    return os.path.join(self.workdir, NAME)

  @property
  def teacher(self):
    return os.path.join(self.directory, 'teacher')

  def pseudo_labels(self, round_number):
    return os.path.join(self.directory, f'pseudo_labels_{round_number}.json')

  def student(self, round_number, rounds):
    """Round `round_number`'s student: the workdir itself for the last."""
    if round_number == rounds:
      return self.workdir
    return os.path.join(self.directory, f'student_{round_number}')

  def teacher_of(self, round_number, rounds):
    return (self.teacher if round_number == 1 else
            self.student(round_number - 1, rounds))


def _unserved(config, keys_at_default):
  """A copy of `config` for a stage that is not served (no export, no
  calibration: fitted on the student that serves) and does not read
  `keys_at_default`, which are set to their defaults: a change to one of
  them does not make the stage's claim refuse it."""
  stage = config.copy_and_resolve_references()
  defaults = default_config.get_config()
  with stage.unlocked():
    stage.export = False
    stage.calibration_split = None
    for key in keys_at_default:
      stage[key] = defaults[key]
  return stage


def teacher_config(config):
  """The teacher's config: the run's, on the labelled images alone; not
  served, and no self-training key (a threshold that kept no pseudo-label
  may change: the trained teacher is kept)."""
  teacher = _unserved(config, [key for key in config.keys()
                               if key.startswith(NAME + '_')])
  with teacher.unlocked():
    teacher.semi_supervised = None
    teacher.unlabeled = None
  return teacher


def student_config(config, round_number, num_labeled, num_pseudo_labeled):
  """A student's config: the run's for the last round; for an intermediate
  one not served, and without the labelling keys (its file records them:
  a later round's threshold may change once it has trained). Its epochs
  over labelled + pseudo-labelled images from `self_training_epochs` or,
  when None, the teacher's number of steps."""
  if round_number == config.self_training_rounds:
    student = config.copy_and_resolve_references()
  else:
    student = _unserved(config, LABELLING_KEYS)
  with student.unlocked():
    student.num_epochs = student_epochs(config, num_labeled,
                                        num_pseudo_labeled)
    if config.self_training_randaugment_num_ops:
      student.randaugment_num_ops = config.self_training_randaugment_num_ops
      student.randaugment_magnitude = (
          config.self_training_randaugment_magnitude)
    student.eval_every_epochs = min(student.eval_every_epochs,
                                    student.num_epochs)
  return student


def student_epochs(config, num_labeled, num_pseudo_labeled):
  """`self_training_epochs`, or the fewest epochs of the student's larger
  training set that take at least the teacher's number of steps."""
  if config.self_training_epochs is not None:
    return config.self_training_epochs
  total = num_labeled + num_pseudo_labeled
  return max(1, math.ceil(config.num_epochs * num_labeled / total))


def per_class_cap(num_unlabeled, num_classes, fraction):
  """⌈fraction · U / C⌉: at most this many pseudo-labels per class."""
  return max(1, math.ceil(fraction * num_unlabeled / num_classes))


def select(probabilities, threshold, cap):
  """The pseudo-labels of one round.

  Args:
    probabilities: float `[U, C]` teacher probabilities, one row per
      unlabelled image in the order of the unlabelled stream.
    threshold: Confidence below which a prediction is not used.
    cap: Largest number of images per class.

  Returns:
    `(indices, labels, confidences)`: int64, int64, float32 arrays, sorted by
    index; per class the `cap` most confident predictions ≥ threshold (ties
    broken by index, so the choice is deterministic).
  """
  probabilities = np.asarray(probabilities, np.float64)
  labels = probabilities.argmax(axis=-1)
  confidences = probabilities.max(axis=-1)
  chosen = []
  for label in range(probabilities.shape[-1]):
    candidates = np.flatnonzero((labels == label) &
                                (confidences >= threshold))
    # Stable sort on -confidence: equal confidences keep index order.
    order = np.argsort(-confidences[candidates], kind='stable')
    chosen.append(candidates[order[:cap]])
  indices = np.sort(np.concatenate(chosen)).astype(np.int64)
  return (indices, labels[indices].astype(np.int64),
          confidences[indices].astype(np.float32))


def record(probabilities, indices, labels, confidences, *, class_names,
           threshold, cap, teacher, teacher_step, num_labeled, names=None):
  """What pseudo_labels_<k>.json holds: the labels and how they were made.

  `num_labeled`: the labelled training images (the student's epochs are
  counted over both). `names`: the unlabelled files (folders), in stream
  order, or None (tfds).
  """
  predicted = np.asarray(probabilities).argmax(axis=-1)
  above = np.asarray(probabilities).max(axis=-1) >= threshold
  value = {
      'teacher': teacher,
      'teacher_step': int(teacher_step),
      'num_labeled': int(num_labeled),
      'threshold': float(threshold),
      'cap_per_class': int(cap),
      'num_unlabeled': int(len(predicted)),
      'num_pseudo_labeled': int(len(indices)),
      'fraction_above_threshold': float(above.mean()) if len(above) else 0.0,
      'mean_confidence': (float(np.mean(confidences)) if len(indices)
                          else None),
      # Per class: predicted at all, predicted confidently, kept.
      'predicted_per_class': _per_class(predicted, class_names),
      'above_threshold_per_class': _per_class(predicted[above], class_names),
      'pseudo_labeled_per_class': _per_class(labels, class_names),
      'indices': [int(i) for i in indices],
      'labels': [int(label) for label in labels],
      'confidences': [round(float(c), 6) for c in confidences],
  }
  if names is not None:
    value['files'] = [names[i] for i in indices]
    # Their contents: a student refuses a file replaced after labelling.
    value['md5'] = unlabeled.file_hashes(value['files'])
  return value


def _per_class(labels, class_names):
  counts = np.bincount(np.asarray(labels, np.int64),
                       minlength=len(class_names))
  return {name: int(count) for name, count in zip(class_names, counts)}


def write(path, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  files.write_json(path, value)


def read(path):
  """A round's pseudo-labels, as `pipeline.from_config` takes them.

  Returns:
    A dict: `indices`, `labels` (int64 arrays), `files` and `md5` (the
    unlabelled files they name and their contents' MD5, or None for tfds),
    `num_unlabeled` (the images the teacher saw) and `sha256` (the file's).
    Its structure is checked here; the label range and
    that the unlabelled images are still those the teacher saw, by the
    pipeline, which has the data.
  """
  # Hashed before and after it is read: the SHA-256 names the labels read.
  digest = fingerprint(path)
  value = files.read_json_object(path)
  if fingerprint(path) != digest:
    raise errors.WorkdirError(
        f'{path} changed while it was read (another process is labelling). '
        'Rerun when it has finished.')
  try:
    indices = np.asarray(value['indices'], np.int64)
    labels = np.asarray(value['labels'], np.int64)
    num_unlabeled = int(value['num_unlabeled'])
    names = value.get('files')
    hashes = value.get('md5')
    for listed in (names, hashes):
      if listed is not None and (len(listed) != len(indices) or
                                 not all(isinstance(n, str) for n in listed)):
        raise ValueError('files or md5 and indices differ in length')
  except (KeyError, TypeError, ValueError) as error:
    raise errors.WorkdirError(
        f'{path} is not a pseudo-label file of keras-sft ({error}). Delete '
        'it and rerun the same command: the teacher labels the images '
        'again.') from error
  if (indices.ndim != 1 or indices.shape != labels.shape or
      (indices.size and min(indices.min(), labels.min()) < 0) or
      len(set(indices.tolist())) != len(indices)):
    raise errors.WorkdirError(
        f'{path} holds malformed pseudo-labels (indices and labels must be '
        'lists of equal length of non-negative integers, no index twice). '
        'Delete it and rerun the same command: the teacher labels the '
        'images again.')
  return dict(indices=indices, labels=labels, files=names, md5=hashes,
              num_unlabeled=num_unlabeled, sha256=digest)


def fingerprint(path):
  """SHA-256 of a pseudo-label file: a student resumes on the same one."""
  with open(path, 'rb') as file:
    return hashlib.sha256(file.read()).hexdigest()


def summary(path):
  """A round's record without its per-image lists (for metrics.json)."""
  value = files.read_json_object(path)
  return {key: item for key, item in value.items()
          if key not in ('indices', 'labels', 'confidences', 'files')}


def claim(config, stages):
  """Claims `<workdir>/self_training` for `config`, before the teacher.

  A workdir holding another run (a supervised one, or self-training with
  other keys) is refused here, not after the teacher has trained; a second
  process on the same workdir is refused by the lock of the stage it
  reaches.
  """
  own = workdir_lib.Workdir(stages.directory)
  top = workdir_lib.Workdir(stages.workdir)
  if (top.has_run() and not own.has_run() and
      top.read_config().get('semi_supervised') != NAME):
    raise errors.WorkdirError(
        f'workdir={stages.workdir!r} holds another run (not a '
        'self-training one). Use a new --workdir.')
  claimed = {key: value for key, value in
             workdir_lib.config_to_dict(config).items()
             if key not in STAGE_KEYS}
  own.claim(claimed, write=is_chief_process())


def is_chief_process(environ=None):
  """The process that writes (see `distribution.is_chief`), from TF_CONFIG:
  known before any strategy exists."""
  tf_config = distribution.read_tf_config(environ)
  if tf_config is None:
    return True
  task = tf_config['task']
  return task['type'] == 'chief' or (
      task['type'] == 'worker' and task['index'] == 0 and
      'chief' not in tf_config['cluster'])


def wait_for(path, timeout_seconds, poll_seconds=1.0):
  """A worker of a multi-worker run waits for the chief's pseudo-labels."""
  deadline = time.monotonic() + timeout_seconds
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise errors.UnavailableError(
          f'The chief wrote no pseudo-labels to {path} within '
          f'{timeout_seconds} s (startup_timeout_seconds). Check the '
          "chief's log; rerun the same command on every worker.")
    time.sleep(poll_seconds)


def log_round(round_number, value):
  logging.info(
      'Self-training round %d: %d of %d unlabelled images pseudo-labelled '
      '(%.1f%% above τ=%r, at most %d per class, mean confidence %s); per '
      'class: %s.', round_number, value['num_pseudo_labeled'],
      value['num_unlabeled'], 100 * value['fraction_above_threshold'],
      value['threshold'], value['cap_per_class'],
      'n/a' if value['mean_confidence'] is None else
      f'{value["mean_confidence"]:.6g}',
      ', '.join(f'{name} {count}' for name, count in
                value['pseudo_labeled_per_class'].items()))
