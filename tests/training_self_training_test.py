"""Self-training: selection, the student's data, the stages of a run."""

import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import image_fixtures

from configs import cifar10_resnet50
from configs import from_run
from keras_sft import errors
from keras_sft import default_config
from keras_sft.data import pipeline
from keras_sft.export import restore
from keras_sft.training import recipe
from keras_sft.training import self_training
from keras_sft.training import train
from keras_sft import workdir as workdir_lib


def test_select_keeps_the_most_confident_per_class_above_the_threshold():
  probabilities = np.array([
      [0.9, 0.1, 0.0],   # 0: class 0, 0.9
      [0.6, 0.4, 0.0],   # 1: class 0, 0.6
      [0.7, 0.3, 0.0],   # 2: class 0, 0.7
      [0.2, 0.8, 0.0],   # 3: class 1, 0.8
      [0.4, 0.3, 0.3],   # 4: class 0, 0.4 (under the threshold)
      [0.1, 0.2, 0.7],   # 5: class 2, 0.7
  ])
  indices, labels, confidences = self_training.select(probabilities, 0.5, 2)
  # Class 0: the two most confident of {0, 1, 2} (not 1); 4 under τ.
  np.testing.assert_array_equal(indices, [0, 2, 3, 5])
  np.testing.assert_array_equal(labels, [0, 0, 1, 2])
  np.testing.assert_allclose(confidences, [0.9, 0.7, 0.8, 0.7], atol=1e-6)


def test_select_breaks_ties_by_index_and_can_select_nothing():
  probabilities = np.full((5, 2), 0.5)
  indices, labels, _ = self_training.select(probabilities, 0.5, 3)
  np.testing.assert_array_equal(indices, [0, 1, 2])
  np.testing.assert_array_equal(labels, [0, 0, 0])
  indices, labels, confidences = self_training.select(probabilities, 0.9, 3)
  assert indices.size == labels.size == confidences.size == 0


def test_per_class_cap_and_student_epochs():
  assert self_training.per_class_cap(3000, 5, 0.5) == 300
  assert self_training.per_class_cap(10, 3, 0.5) == 2  # ⌈1.67⌉
  assert self_training.per_class_cap(1, 10, 0.1) == 1
  config = default_config.get_config()
  config.num_epochs = 60
  # The teacher's steps: 60 epochs of 50 images = 2 epochs of 1550.
  assert self_training.student_epochs(config, 50, 1500) == 2
  assert self_training.student_epochs(config, 50, 0) == 60
  # 10 epochs of 500 = 2.5 epochs of 2000: 3, not fewer steps than the
  # teacher (rounding gave 2: 250 steps where the teacher took 310).
  config.num_epochs = 10
  assert self_training.student_epochs(config, 500, 1500) == 3
  config.num_epochs = 1
  assert self_training.student_epochs(config, 10, 1000) == 1
  config.self_training_epochs = 7
  assert self_training.student_epochs(config, 50, 1500) == 7


@pytest.mark.parametrize('key,value,match', [
    ('self_training_threshold', 1.0, r'\[0, 1\)'),
    ('self_training_threshold', -0.1, r'\[0, 1\)'),
    ('self_training_threshold', float('nan'), r'\[0, 1\)'),
    ('self_training_fraction', 0.0, r'\(0, 1\]'),
    ('self_training_fraction', 1.5, 'self_training_fraction'),
    ('self_training_rounds', 0, 'self_training_rounds'),
    ('self_training_rounds', 11, 'self_training_rounds'),
    ('self_training_epochs', 0, 'self_training_epochs'),
    ('self_training_randaugment_num_ops', -1,
     'self_training_randaugment_num_ops'),
    ('self_training_randaugment_num_ops', True,
     'self_training_randaugment_num_ops'),
    ('self_training_randaugment_num_ops', 11,
     'self_training_randaugment_num_ops'),
    ('self_training_randaugment_magnitude', 1.5,
     'self_training_randaugment_magnitude'),
    ('self_training_randaugment_magnitude', None,
     'self_training_randaugment_magnitude'),
])
def test_bad_values_are_one_error_before_anything_runs(key, value, match):
  config = default_config.get_config()
  setattr(config, key, value)
  with pytest.raises(errors.ConfigError, match=match):
    train.check_config(config)


def test_teacher_and_student_configs():
  config = default_config.get_config()
  config.update(dict(unlabeled='folder:/u', semi_supervised='self_training',
                     calibration_split='train[:10]', num_epochs=60,
                     eval_every_epochs=5, self_training_rounds=2))
  teacher = self_training.teacher_config(config)
  assert (teacher.semi_supervised, teacher.unlabeled, teacher.export,
          teacher.calibration_split) == (None, None, False, None)
  assert config.semi_supervised == 'self_training'  # Not changed.
  # The teacher reads no self-training key: at their defaults, so changing
  # one (e.g. a threshold that kept nothing) keeps a trained teacher.
  config.self_training_threshold = 0.9
  assert self_training.teacher_config(config).self_training_threshold == 0.5
  config.self_training_threshold = 0.5
  middle = self_training.student_config(config, 1, 50, 1500)
  # It reads the unlabelled images (its pseudo-labelled share) and is not
  # served.
  assert (middle.semi_supervised, middle.unlabeled, middle.export,
          middle.calibration_split, middle.num_epochs,
          middle.eval_every_epochs) == ('self_training', 'folder:/u', False,
                                        None, 2, 2)
  last = self_training.student_config(config, 2, 50, 1500)
  assert (last.semi_supervised, last.export, last.calibration_split,
          last.num_epochs) == ('self_training', True, 'train[:10]', 2)
  # An intermediate student reads no labelling key (its file records them),
  # so a later round's threshold may change after it trained; the last
  # student is the run and keeps the config's.
  config.self_training_threshold = 0.9
  assert self_training.student_config(
      config, 1, 50, 1500).self_training_threshold == 0.5
  assert self_training.student_config(
      config, 2, 50, 1500).self_training_threshold == 0.9


def test_student_noise_is_the_students_alone():
  config = default_config.get_config()
  config.update(dict(unlabeled='folder:/u', semi_supervised='self_training',
                     randaugment_num_ops=1, randaugment_magnitude=0.2,
                     self_training_rounds=2))
  # Off (0): every stage has the run's own augmentation.
  for stage in (self_training.teacher_config(config),
                self_training.student_config(config, 1, 50, 1500),
                self_training.student_config(config, 2, 50, 1500)):
    assert (stage.randaugment_num_ops, stage.randaugment_magnitude) == (1, 0.2)
  config.update(dict(self_training_randaugment_num_ops=3,
                     self_training_randaugment_magnitude=0.7))
  teacher = self_training.teacher_config(config)
  assert (teacher.randaugment_num_ops, teacher.randaugment_magnitude) == (
      1, 0.2)
  # The teacher reads neither key: a change keeps a trained teacher.
  assert teacher.self_training_randaugment_num_ops == 0
  for round_number in (1, 2):
    student = self_training.student_config(config, round_number, 50, 1500)
    assert (student.randaugment_num_ops,
            student.randaugment_magnitude) == (3, 0.7)
  # Not in the claim of self_training/ (each student's own claim has them).
  assert {'self_training_randaugment_num_ops',
          'self_training_randaugment_magnitude'} <= set(
              self_training.STAGE_KEYS)


def _images(count):
  return tf.data.Dataset.from_tensor_slices(
      np.arange(count, dtype=np.uint8).reshape(count, 1, 1, 1) *
      np.ones((1, 2, 2, 3), np.uint8))


def _pseudo(indices, labels, num_unlabeled, files=None):
  return dict(indices=np.array(indices), labels=np.array(labels),
              num_unlabeled=num_unlabeled, files=files)


def test_pseudo_labelled_images_join_the_training_examples():
  labeled = tf.data.Dataset.from_tensor_slices(
      (np.full((4, 2, 2, 3), 200, np.uint8), np.array([0, 1, 0, 1], np.int64)))
  info = pipeline.DatasetInfo(num_classes=3, class_names=('a', 'b', 'c'),
                              num_train_examples=4, num_eval_examples=1,
                              train_class_counts=(2, 2, 0),
                              num_unlabeled_examples=6)
  pseudo = _pseudo([1, 4], [2, 0], 6)
  examples, new_info = pipeline._with_pseudo_labels(  # pylint: disable=protected-access
      labeled, info, _images(6), None, pseudo, seed=0)
  seen = [(int(image[0, 0, 0]), int(label)) for image, label in examples]
  assert sorted(seen) == sorted([(200, 0), (200, 1), (200, 0), (200, 1),
                                 (1, 2), (4, 0)])
  assert new_info.num_train_examples == 6
  assert new_info.train_class_counts == (3, 2, 1)
  # The same seed, the same order; pseudo-labelled images are spread in.
  again = [(int(image[0, 0, 0]), int(label)) for image, label in
           pipeline._with_pseudo_labels(  # pylint: disable=protected-access
               labeled, info, _images(6), None, pseudo, seed=0)[0]]
  assert again == seen


def test_pseudo_labels_of_another_unlabelled_set_are_refused():
  labeled = tf.data.Dataset.from_tensor_slices(
      (np.zeros((2, 2, 2, 3), np.uint8), np.array([0, 1], np.int64)))
  info = pipeline.DatasetInfo(num_classes=2, class_names=('a', 'b'),
                              num_train_examples=2, num_eval_examples=1,
                              num_unlabeled_examples=3)
  names = ('a.png', 'b.png', 'c.png')
  with pytest.raises(errors.DataError, match='labelled 4 unlabelled images; '
                     'there are 3 now'):
    pipeline._with_pseudo_labels(  # pylint: disable=protected-access
        labeled, info, _images(3), names, _pseudo([0], [0], 4), seed=0)
  with pytest.raises(errors.DataError, match="was 'b.png' for the teacher "
                     "and is 'c.png' now"):
    pipeline._with_pseudo_labels(  # pylint: disable=protected-access
        labeled, info, _images(3), names,
        _pseudo([0, 2], [0, 1], 3, files=['a.png', 'b.png']), seed=0)
  with pytest.raises(errors.DataError, match='label 2'):
    pipeline._with_pseudo_labels(  # pylint: disable=protected-access
        labeled, info, _images(3), names, _pseudo([0], [2], 3), seed=0)
  with pytest.raises(errors.DataError, match='holds no pseudo-labels'):
    pipeline._with_pseudo_labels(  # pylint: disable=protected-access
        labeled, info, _images(3), names, _pseudo([], [], 3), seed=0)


def test_a_labelled_file_with_other_contents_is_refused(tmp_path):
  labeled = tf.data.Dataset.from_tensor_slices(
      (np.zeros((2, 2, 2, 3), np.uint8), np.array([0, 1], np.int64)))
  info = pipeline.DatasetInfo(num_classes=2, class_names=('a', 'b'),
                              num_train_examples=2, num_eval_examples=1,
                              num_unlabeled_examples=2)
  names = [str(tmp_path / 'a.png'), str(tmp_path / 'b.png')]
  for name in names:
    with open(name, 'wb') as file:
      file.write(name.encode())
  record = self_training.record(
      np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]), np.array([0, 1]),
      np.array([0.9, 0.8]), class_names=('a', 'b'), threshold=0.5, cap=1,
      teacher='t', teacher_step=1, num_labeled=2, names=names)
  path = str(tmp_path / 'pseudo_labels_1.json')
  self_training.write(path, record)
  assert self_training.read(path)['sha256'] == self_training.fingerprint(path)
  pipeline._with_pseudo_labels(  # pylint: disable=protected-access
      labeled, info, _images(2), names, self_training.read(path), seed=0)
  with open(names[1], 'wb') as file:  # Same name, other image.
    file.write(b'another image')
  with pytest.raises(errors.DataError, match='b.png.* has other contents'):
    pipeline._with_pseudo_labels(  # pylint: disable=protected-access
        labeled, info, _images(2), names, self_training.read(path), seed=0)


@pytest.mark.parametrize('content', [
    '[1, 2]', '{"indices": [0, 1], "labels": [0], "num_unlabeled": 2}',
    '{"indices": [0, 0], "labels": [0, 1], "num_unlabeled": 2}',
    '{"indices": [-1], "labels": [0], "num_unlabeled": 2}',
    '{"indices": "x", "labels": [0], "num_unlabeled": 2}',
    '{"indices": [0], "labels": [0]}',
    '{"labels": [0]}', 'not json',
    '{"indices": [0], "labels": [0], "num_unlabeled": 1, "files": [1]}'])
def test_a_malformed_pseudo_label_file_names_the_fix(tmp_path, content):
  path = tmp_path / 'pseudo_labels_1.json'
  path.write_text(content)
  with pytest.raises(errors.UserError, match='pseudo_labels_1.json'):
    self_training.read(str(path))


@pytest.mark.parametrize('tf_config,chief', [
    (None, True),
    ({'cluster': {'worker': ['a:1', 'b:1']},
      'task': {'type': 'worker', 'index': 0}}, True),
    ({'cluster': {'worker': ['a:1', 'b:1']},
      'task': {'type': 'worker', 'index': 1}}, False),
    ({'cluster': {'chief': ['c:1'], 'worker': ['a:1']},
      'task': {'type': 'worker', 'index': 0}}, False),
    ({'cluster': {'chief': ['c:1'], 'worker': ['a:1']},
      'task': {'type': 'chief', 'index': 0}}, True),
])
def test_the_chief_writes_the_pseudo_labels(tf_config, chief):
  environ = {} if tf_config is None else {'TF_CONFIG': json.dumps(tf_config)}
  assert self_training.is_chief_process(environ) == chief


def test_a_worker_waits_for_the_chiefs_labels_then_names_the_timeout(
    tmp_path):
  path = str(tmp_path / 'pseudo_labels_1.json')
  with pytest.raises(errors.UnavailableError, match='startup_timeout'):
    self_training.wait_for(path, 0.2, poll_seconds=0.05)
  open(path, 'w').close()
  self_training.wait_for(path, 0.2, poll_seconds=0.05)


def _write_unlabeled(root, count=9, seed=3):
  rng = np.random.default_rng(seed)
  os.makedirs(root)
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
        os.path.join(root, f'{i}.png'))


def _config(root, unlabeled):
  config = cifar10_resnet50.get_config('smoke')
  config.update(dict(dataset=f'folder:{root}',
                     unlabeled=f'folder:{unlabeled}',
                     semi_supervised='self_training', global_batch_size=4,
                     steps_per_epoch=None, num_epochs=2, eval_steps=None,
                     self_training_threshold=0.0))
  return config


def _folders_and_config(tmp_path):
  """A labelled folder (12 train images, 3 classes), 9 unlabelled images,
  a workdir path and the config of a tiny self-training run on them."""
  root = str(tmp_path / 'labelled')
  image_fixtures.write_image_folder(root)
  unlabeled = str(tmp_path / 'unlabelled')
  _write_unlabeled(unlabeled)
  return root, unlabeled, str(tmp_path / 'run'), _config(root, unlabeled)


def test_a_workdir_of_another_run_is_refused_before_the_teacher(tmp_path):
  workdir = str(tmp_path / 'run')
  workdir_lib.Workdir(workdir).claim(default_config.get_config())
  config = _config(str(tmp_path / 'labelled'), str(tmp_path / 'unlabelled'))
  with pytest.raises(errors.WorkdirError, match='another run'):
    self_training.claim(config, self_training.Stages(workdir))
  assert not os.path.exists(os.path.join(workdir, 'self_training'))


def test_a_deleted_self_training_record_of_a_self_training_run_is_made_again(
    tmp_path):
  workdir = str(tmp_path / 'run')
  config = _config(str(tmp_path / 'labelled'), str(tmp_path / 'unlabelled'))
  workdir_lib.Workdir(workdir).claim(config)  # The last student's.
  stages = self_training.Stages(workdir)
  self_training.claim(config, stages)
  assert workdir_lib.Workdir(stages.directory).has_run()


def test_a_bad_unlabelled_folder_fails_before_the_teacher(tmp_path):
  root = str(tmp_path / 'labelled')
  image_fixtures.write_image_folder(root)
  workdir = str(tmp_path / 'run')
  config = _config(root, str(tmp_path / 'missing'))
  with pytest.raises(errors.UserError, match='missing'):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'self_training'))


def test_labels_are_made_again_when_their_keys_changed_before_the_student(
    tmp_path):
  config = _config(str(tmp_path / 'labelled'), str(tmp_path / 'unlabelled'))
  stages = self_training.Stages(str(tmp_path / 'run'))
  assert train._needs_labels(config, stages, 1)  # pylint: disable=protected-access
  self_training.write(stages.pseudo_labels(1), self_training.record(
      np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]), np.array([0, 1]),
      np.array([0.9, 0.8]), class_names=('a', 'b'), threshold=0.0, cap=1,
      teacher='t', teacher_step=1, num_labeled=2))
  assert not train._needs_labels(config, stages, 1)  # pylint: disable=protected-access
  config.self_training_threshold = 0.3
  assert train._needs_labels(config, stages, 1)  # pylint: disable=protected-access
  config.self_training_threshold = 0.0
  config.self_training_fraction = 1.0  # ⌈1 · 2 / 2⌉ = 1: the same cap.
  assert not train._needs_labels(config, stages, 1)  # pylint: disable=protected-access
  config.self_training_threshold = 0.3
  # Once the student has started, its own claim refuses the change.
  workdir_lib.Workdir(stages.workdir).claim(config)
  assert not train._needs_labels(config, stages, 1)  # pylint: disable=protected-access


def test_teacher_labels_student_trains_and_a_rerun_redoes_nothing(tmp_path):
  root, unlabeled, workdir, config = _folders_and_config(tmp_path)
  # The student's own noise (its config.json differs from the run's).
  config.self_training_randaugment_num_ops = 1
  metrics = train.train_and_evaluate(config, workdir)

  stages = self_training.Stages(workdir)
  teacher = workdir_lib.Workdir(stages.teacher)
  assert teacher.read_config()['semi_supervised'] is None
  with open(stages.pseudo_labels(1)) as file:
    labels = json.load(file)
  # ⌈0.5 · 9 / 3⌉ = 2 per class at most; τ = 0 keeps every prediction.
  assert labels['cap_per_class'] == 2
  assert labels['num_unlabeled'] == 9 and labels['num_labeled'] == 12
  assert sum(labels['pseudo_labeled_per_class'].values()) == len(
      labels['indices']) == labels['num_pseudo_labeled']
  assert max(labels['pseudo_labeled_per_class'].values()) <= 2
  assert sum(labels['predicted_per_class'].values()) == 9
  assert all(path.startswith(unlabeled) for path in labels['files'])
  # The student: 12 + n images for ⌈2 · 12 / (12 + n)⌉ epochs, the
  # teacher's 3 · 2 = 6 steps in whole epochs.
  n = labels['num_pseudo_labeled']
  student = workdir_lib.Workdir(workdir).read_config()
  assert student['num_epochs'] == math.ceil(2 * 12 / (12 + n))
  assert metrics['step'] == student['num_epochs'] * ((12 + n) // 4)
  record = metrics['self_training']
  assert record['teacher']['step'] == 6
  assert record['rounds'][0]['num_pseudo_labeled'] == n
  assert 'indices' not in record['rounds'][0]
  assert os.listdir(workdir_lib.Workdir(workdir).export)  # The student's.
  assert not os.path.exists(teacher.export)

  # configs/from_run.py on the run's config.json gives the run's own
  # config, not its student's (hostile pass: a tuning trial's rerun command
  # trained a teacher of the student's epochs and noise).
  assert student['randaugment_num_ops'] == 1
  rerun = from_run.get_config(os.path.join(workdir, 'config.json'))
  assert workdir_lib.config_to_dict(rerun) == workdir_lib.config_to_dict(
      config)
  assert (rerun.num_epochs, rerun.randaugment_num_ops) == (2, 0)

  # A rerun: the teacher and the labels are not redone, the student resumes
  # at its end; the same metrics.
  modified = os.path.getmtime(stages.pseudo_labels(1))
  again = train.train_and_evaluate(config, workdir)
  assert os.path.getmtime(stages.pseudo_labels(1)) == modified
  assert again['step'] == metrics['step']
  assert again['eval'] == pytest.approx(metrics['eval'])
  # --mode=eval evaluates the student on its own data and keeps the record.
  evaluated = train.evaluate(config, workdir)
  assert evaluated['step'] == metrics['step']
  assert evaluated['self_training'] == metrics['self_training']
  # Other self-training keys on this workdir: the student refuses them.
  other = _config(root, unlabeled)
  other.self_training_fraction = 0.25
  with pytest.raises(errors.WorkdirError, match='self_training_fraction'):
    train.train_and_evaluate(other, workdir)
  # A pseudo-labelled file replaced by another image of the same name: its
  # label would be wrong; refused.
  replaced = labels['files'][0]
  with open(replaced, 'rb') as file:
    original = file.read()
  Image.new('RGB', (32, 32)).save(replaced)
  with pytest.raises(errors.DataError, match='other contents'):
    train.train_and_evaluate(config, workdir)
  with open(replaced, 'wb') as file:
    file.write(original)
  # The pseudo-label file changed under a started student: refused.
  with open(stages.pseudo_labels(1)) as file:
    changed = json.load(file)
  changed['labels'] = [(label + 1) % 3 for label in changed['labels']]
  with open(stages.pseudo_labels(1), 'w') as file:
    json.dump(changed, file)
  with pytest.raises(errors.WorkdirError, match='pseudo-label file'):
    train.train_and_evaluate(config, workdir)
  with open(stages.pseudo_labels(1), 'w') as file:
    json.dump(labels, file)
  # Unlabelled images added after the teacher labelled them: the indices
  # would name other images; refused, naming the way out.
  _write_unlabeled(os.path.join(unlabeled, 'more'), count=1, seed=9)
  with pytest.raises(errors.DataError, match='changed since the teacher'):
    train.train_and_evaluate(config, workdir)


def test_a_round_that_keeps_nothing_then_two_rounds_from_their_teachers(
    tmp_path, caplog, monkeypatch):
  """One teacher for both (it is the costly part): a round that keeps no
  pseudo-label is one error that keeps the teacher; then two rounds, each
  student started from its teacher."""
  root, unlabeled, workdir, config = _folders_and_config(tmp_path)
  config.update(dict(self_training_rounds=2, num_epochs=1,
                     self_training_student_init='teacher',
                     self_training_threshold=0.99))
  # The tiny network's confidences are not known in advance: no prediction
  # reaches τ = 0.99 here by construction.
  select = self_training.select
  monkeypatch.setattr(
      self_training, 'select',
      lambda probabilities, threshold, cap: select(
          probabilities * (threshold < 0.99), threshold, cap))
  with pytest.raises(errors.DataError, match='not confident about any'):
    train.train_and_evaluate(config, workdir)
  stages = self_training.Stages(workdir)
  assert not os.path.exists(stages.pseudo_labels(1))
  trained = workdir_lib.Workdir(stages.teacher).read_config()
  backup = os.path.join(workdir_lib.Workdir(stages.teacher).checkpoints,
                        'final.weights.h5')
  modified = os.path.getmtime(backup)
  # The finished teacher is not trained again, but it is checked: a
  # labelled image moved to another class is refused (its label changed).
  cat = os.path.join(root, 'train', 'cat', '0.png')
  moved = os.path.join(root, 'train', 'dog', 'was_a_cat.png')
  os.rename(cat, moved)
  with pytest.raises(errors.WorkdirError, match='other data'):
    train.train_and_evaluate(config, workdir)
  os.rename(moved, cat)

  # A lower threshold: the same teacher labels; two rounds train.
  config.self_training_threshold = 0.0
  caplog.set_level('INFO')
  metrics = train.train_and_evaluate(config, workdir)
  assert workdir_lib.Workdir(stages.teacher).read_config() == trained
  assert os.path.getmtime(backup) == modified
  first = stages.student(1, 2)
  assert first == os.path.join(workdir, 'self_training', 'student_1')
  # Round 2's labels come from round 1's student, which exported nothing.
  with open(stages.pseudo_labels(2)) as file:
    assert json.load(file)['teacher'] == first
  assert not os.path.exists(workdir_lib.Workdir(first).export)
  rounds = metrics['self_training']['rounds']
  assert len(rounds) == 2 and 'student_top1' in rounds[0]
  assert rounds[0]['num_pseudo_labeled'] > 0
  started = [record.getMessage() for record in caplog.records
             if 'Started from the network weights' in record.getMessage()]
  assert started == [
      f'Started from the network weights of the run in {stages.teacher}.',
      f'Started from the network weights of the run in {first}.']

  # What a student starts from: its teacher's served network weights.
  teacher, teacher_config, _, _ = restore.restore_run_model(stages.teacher)
  plan = recipe.make_plan(teacher_config, 12)
  student = recipe.build_model(teacher_config, 3, plan)
  train._start_from(student, stages.teacher)  # pylint: disable=protected-access
  for mine, theirs in zip(student.network.weights, teacher.network.weights):
    np.testing.assert_array_equal(mine.numpy(), theirs.numpy())


def test_a_teacher_counts_as_finished_only_with_its_eval_and_backups(
    tmp_path):
  teacher = workdir_lib.Workdir(str(tmp_path / 'teacher'))
  os.makedirs(teacher.checkpoints)
  assert train._finished_metrics(teacher.path) is None  # pylint: disable=protected-access
  with open(teacher.metrics_file, 'w') as file:
    json.dump({'step': 4, 'total_steps': 4}, file)  # No eval.
  assert train._finished_metrics(teacher.path) is None  # pylint: disable=protected-access
  with open(teacher.metrics_file, 'w') as file:
    json.dump({'step': 4, 'total_steps': 4, 'eval': {'accuracy': 0.5}}, file)
  assert train._finished_metrics(teacher.path) is None  # No backup.  # pylint: disable=protected-access
