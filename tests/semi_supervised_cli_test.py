"""End to end: FixMatch on image folders, resumed mid-epoch and from the
command line."""

import os
import subprocess
import sys

import keras
import numpy as np
from PIL import Image

import conftest
import image_fixtures

from configs import cifar10_resnet50
from keras_sft.models import fixmatch
from keras_sft.training import checkpoints
from keras_sft.training import recipe
from keras_sft.training import train
from keras_sft import workdir as workdir_lib


def _write_unlabeled(root, count=10, seed=5):
  rng = np.random.default_rng(seed)
  for i in range(count):
    path = os.path.join(root, f'batch{i % 3}', f'{i}.png')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(path)


def _folders(tmp_path):
  root = str(tmp_path / 'labelled')
  image_fixtures.write_image_folder(root)
  unlabeled = str(tmp_path / 'unlabelled')
  _write_unlabeled(unlabeled)
  return root, unlabeled


def _tiny_fixmatch_run(workdir, root, unlabeled):
  """The real start of a run (config checks, both data streams, the
  workdir's claim) with a tiny FixMatch model in place of ResNet50."""
  config = cifar10_resnet50.get_config('smoke')
  config.update(dict(
      dataset=f'folder:{root}', unlabeled=f'folder:{unlabeled}',
      semi_supervised='fixmatch', fixmatch_mu=2, fixmatch_threshold=0.4,
      fixmatch_randaugment_num_ops=1, image_size=32, global_batch_size=4,
      steps_per_epoch=3, num_epochs=2, eval_steps=None, export=False,
      dropout_rate=0.5))
  run = train._start(config, str(workdir))  # pylint: disable=protected-access
  run.plan = recipe.make_plan(config, run.data.info.num_train_examples)

  def build():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, strides=4)(inputs / 255.0)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.5, seed=0)(x)
    outputs = keras.layers.Dense(3, name='head')(x)
    model = fixmatch.FixMatchClassifier(
        keras.Model(inputs, outputs), threshold=config.fixmatch_threshold,
        weight_decay=config.weight_decay)
    recipe.compile_model(model, keras.optimizers.SGD(0.1, momentum=0.9))
    model(np.zeros((1, 32, 32, 3), np.float32))
    model.optimizer.build(model.trainable_variables)
    run.checkpointer.restore(model)
    return model

  return run, build


def test_resumed_mid_epoch_equals_an_uninterrupted_run(tmp_path):
  """Both streams resume at the step of the backup: same weights."""
  root, unlabeled = _folders(tmp_path)
  run, build = _tiny_fixmatch_run(tmp_path / 'whole', root, unlabeled)
  with run.lock:
    uninterrupted = build()
    train._fit_to_end(run, uninterrupted)  # pylint: disable=protected-access
  rows = conftest.history_rows(str(tmp_path / 'whole'))
  assert len(rows) == 2
  for row in rows:
    assert 0 <= float(row[fixmatch.MASK_RATE]) <= 1
    assert float(row[fixmatch.UNLABELED_CE]) >= 0
    assert 'val_' + fixmatch.MASK_RATE not in row

  run, build = _tiny_fixmatch_run(tmp_path / 'resumed', root, unlabeled)
  with run.lock:
    first = build()
    train._fit(run, first, end_epoch=1, steps=2)  # pylint: disable=protected-access
    assert run.checkpointer.latest()[1] == 2
    resumed = build()  # A fresh model restores step 2, mid-epoch.
    assert checkpoints.trained_steps(resumed) == 2
    train._fit_to_end(run, resumed)  # pylint: disable=protected-access
  assert checkpoints.trained_steps(resumed) == 6
  for want, got in zip(uninterrupted.get_weights(), resumed.get_weights()):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_command_line_trains_on_an_unlabelled_folder(tmp_path):
  root, unlabeled = _folders(tmp_path)
  workdir = str(tmp_path / 'run')
  command = [
      sys.executable, '-m', 'keras_sft.main',
      '--config=configs/cifar10_resnet50.py:smoke', f'--workdir={workdir}',
      f'--config.dataset=folder:{root}', '--config.global_batch_size=4',
      f'--config.unlabeled=folder:{unlabeled}',
      '--config.semi_supervised=fixmatch', '--config.fixmatch_mu=1',
      '--config.fixmatch_randaugment_num_ops=1', '--config.export=False']
  result = subprocess.run(command, capture_output=True, text=True,
                          timeout=600, cwd=conftest.REPO_ROOT,
                          env=conftest.cli_env())
  assert result.returncode == 0, result.stderr[-5000:]
  metrics = conftest.read_metrics(workdir)
  assert metrics['step'] == metrics['total_steps'] == 4
  rows = conftest.history_rows(workdir)
  assert all(fixmatch.MASK_RATE in row and fixmatch.UNLABELED_CE in row
             for row in rows)
  with open(workdir_lib.Workdir(workdir).log_file) as file:
    assert ('Semi-supervised (fixmatch): 10 unlabelled images from folder:'
            in file.read())

  bad = subprocess.run(command[:-1] + ['--config.fixmatch_threshold=1.5'],
                       capture_output=True, text=True, timeout=600,
                       cwd=conftest.REPO_ROOT, env=conftest.cli_env())
  assert bad.returncode != 0
  errors = [line for line in bad.stderr.splitlines()
            if line.startswith('error:')]
  assert len(errors) == 1 and 'fixmatch_threshold' in errors[0]
