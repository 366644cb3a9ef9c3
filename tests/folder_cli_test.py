"""End to end: the command line on an image folder, then --mode=evaluate."""

import os
import subprocess
import sys

import numpy as np

import conftest
import image_fixtures

from keras_sft import workdir as workdir_lib


def _cli(workdir, root, *flags):
  command = [
      sys.executable, '-m', 'keras_sft.main',
      '--config=configs/cifar10_resnet50.py:smoke', f'--workdir={workdir}',
      f'--config.dataset=folder:{root}', '--config.global_batch_size=4',
      '--config.export=False', *flags
  ]
  result = subprocess.run(command, capture_output=True, text=True,
                          timeout=600, cwd=conftest.REPO_ROOT,
                          env=conftest.cli_env())
  assert result.returncode == 0, result.stderr[-5000:]
  return result


def test_folder_dataset_trains_reports_and_evaluates_again(tmp_path):
  root = str(tmp_path / 'images')
  written = image_fixtures.write_image_folder(root)
  num_test = sum(1 for path in written if path.startswith('test/'))
  workdir = str(tmp_path / 'run')

  _cli(workdir, root)

  metrics = conftest.read_metrics(workdir)
  assert metrics['step'] == metrics['total_steps'] == 4
  report = metrics['report']
  assert report['class_names'] == list(image_fixtures.CLASSES)
  # The smoke config's 2 eval steps of 4 cover all 6 test images.
  assert np.sum(report['confusion_matrix']) == num_test == 6
  assert abs(report['top1'] - metrics['eval']['accuracy']) < 1e-6
  # 3 classes: the label is always among the top 5.
  assert report['top5'] == 1.0
  assert set(report['per_class_accuracy']) == set(image_fixtures.CLASSES)
  for name in ('confusion_matrix.png', 'curves.png', 'tensorboard/report'):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(workdir_lib.Workdir(workdir).log_file) as file:
    assert '12 train / 6 eval examples, 3 classes' in file.read()
  rows_before = conftest.history_rows(workdir)
  os.remove(workdir_lib.Workdir(workdir).metrics_file)
  os.remove(workdir_lib.Workdir(workdir).confusion_matrix_png)

  result = _cli(workdir, root, '--mode=evaluate')

  assert 'Evaluating the backup at step 4 of 4' in result.stderr
  again = conftest.read_metrics(workdir)
  assert again['step'] == 4
  assert again['report']['confusion_matrix'] == report['confusion_matrix']
  assert os.path.exists(workdir_lib.Workdir(workdir).confusion_matrix_png)
  assert conftest.history_rows(workdir) == rows_before  # No training happened.
