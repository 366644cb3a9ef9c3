"""benchmarks/accuracy.py --quick end to end, on synthetic idx files.

CI has neither Debian's Fashion-MNIST nor torch: the test writes small idx
.gz files of random images (the format the benchmark reads) and accepts the
seed loop's row as skipped when torch is not installed. It checks plumbing
only: the folder export, keras-sft's command line, the backbone weights file
and the fine-tuning run that loads it, the table and the JSON.
"""

import gzip
import importlib.util
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

import conftest

SCRIPT = os.path.join(conftest.REPO_ROOT, 'benchmarks', 'accuracy.py')


def _write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(
      int(n).to_bytes(4, 'big') for n in array.shape)
  with gzip.open(path, 'wb') as file:
    file.write(header + array.astype(np.uint8).tobytes())


def _write_fake_fashion_mnist(directory, train_per_class=50,
                              test_per_class=20):
  rng = np.random.default_rng(0)
  for prefix, per_class in (('train', train_per_class),
                            ('t10k', test_per_class)):
    labels = np.tile(np.arange(10), per_class)
    images = rng.integers(0, 256, (labels.size, 28, 28))
    _write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'),
               images)
    _write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'),
               labels)


def _import_accuracy():
  sys.path.insert(0, os.path.dirname(SCRIPT))
  try:
    import accuracy  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  return accuracy


def _exported_indices(root, split):
  """{class folder: sorted idx-file indices} of one split of an export."""
  return {name: sorted(int(file[:-4]) for file in os.listdir(
      os.path.join(root, split, name)))
          for name in sorted(os.listdir(os.path.join(root, split)))}


def test_read_idx_round_trip(tmp_path):
  accuracy = _import_accuracy()
  array = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
  _write_idx(str(tmp_path / 'x.gz'), array)
  np.testing.assert_array_equal(accuracy.read_idx(str(tmp_path / 'x.gz')),
                                array)
  rgb = accuracy.to_rgb32(array[1].astype(np.uint8))
  assert rgb.shape == (32, 32, 3)
  np.testing.assert_array_equal(rgb[2:30, 2:30, 1], array[1])
  assert rgb[:2].max() == 0


def test_imbalanced_counts_fall_geometrically():
  accuracy = _import_accuracy()
  # 100 · 10^(-i/4): 100, 56.2, 31.6, 17.8, 10.
  assert accuracy.imbalanced_counts(100, 5, 10.0) == [100, 56, 32, 18, 10]
  assert accuracy.imbalanced_counts(20, 5, 10.0) == [20, 11, 6, 4, 2]
  assert accuracy.imbalanced_counts(7, 5, 1.0) == [7] * 5
  assert accuracy.imbalanced_counts(3, 5, 100.0)[-1] == 1  # at least one


def test_select_counts_per_class_and_skip():
  accuracy = _import_accuracy()
  labels = np.array([0, 1, 0, 1, 0, 1, 0, 2])
  assert accuracy.select(labels, [0, 1], 2) == [0, 1, 2, 3]
  assert accuracy.select(labels, [0, 1], [3, 1]) == [0, 1, 2, 4]
  # After the first 2 of each class: class 0's 3rd and 4th, class 1's 3rd.
  assert accuracy.select(labels, [0, 1], [2, 1], skip=2) == [4, 5, 6]
  assert accuracy.select(labels, [0, 2], None) == [0, 2, 4, 6, 7]
  with pytest.raises(ValueError, match='after the first 2'):
    accuracy.select(labels, [1], 2, skip=2)


def test_export_folder_imbalanced_train_and_disjoint_val(tmp_path):
  accuracy = _import_accuracy()
  source = tmp_path / 'idx'
  source.mkdir()
  _write_fake_fashion_mnist(str(source), train_per_class=12,
                            test_per_class=3)
  root = accuracy.export_folder(str(source), str(tmp_path / 'data'), 'imb',
                                range(5, 10), [8, 5, 3, 2, 1], 2,
                                val_per_class=4)
  train = _exported_indices(root, 'train')
  val = _exported_indices(root, 'val')
  test = _exported_indices(root, 'test')
  names = accuracy.CLASS_NAMES[5:]
  assert [len(train[name]) for name in names] == [8, 5, 3, 2, 1]
  assert [len(val[name]) for name in names] == [4] * 5
  assert [len(test[name]) for name in names] == [2] * 5
  # The fake files hold label l at indices l, l + 10, l + 20, ...: train is
  # the first of each class, val the 4 after the first 8 (the largest count).
  for label, name, count in zip(range(5, 10), names, [8, 5, 3, 2, 1]):
    assert train[name] == [label + 10 * k for k in range(count)]
    assert val[name] == [label + 10 * k for k in range(8, 12)]
    assert not set(train[name]) & set(val[name])
  # Written once: the same spec returns without rewriting.
  marker = os.path.join(root, '.complete')
  written = os.path.getmtime(marker)
  assert accuracy.export_folder(str(source), str(tmp_path / 'data'), 'imb',
                                range(5, 10), [8, 5, 3, 2, 1], 2,
                                val_per_class=4) == root
  assert os.path.getmtime(marker) == written


def test_choose_rows_by_name_or_work_directory():
  accuracy = _import_accuracy()
  rows = accuracy.PROXY_ROWS
  assert accuracy.choose_rows(None, rows, ('fine-tuned',)) == ('fine-tuned',)
  # A name with a comma can only be given by its work directory.
  assert accuracy.choose_rows(
      'finetune_no_augmentation, layer_decay=0.7', rows, ()) == (
          'fine-tuned, no augmentation', 'layer_decay=0.7')
  with pytest.raises(ValueError, match='finetune_l2sp'):
    accuracy.choose_rows('fine-tuned, no augmentation', rows, ())


def test_every_proxy_row_passes_the_config_checks(tmp_path):
  """Each row's flags, as run_keras_sft gives them, parse and are accepted.

  A refused value would otherwise show only as a FAILED row after the
  pretraining of a full run.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from keras_sft.training import train  # pylint: disable=g-import-not-at-top
  accuracy = _import_accuracy()
  # The config checks read a weights file's layer list, not its shapes.
  backbone = tmp_path / 'backbone.weights.h5'
  with h5py.File(backbone, 'w') as file:
    file.create_dataset('layers/conv/vars/0', data=np.zeros(3))
  for name, (_, pretrained, extra) in accuracy.PROXY_ROWS.items():
    argv = ['main', '--config=configs/default.py',
            '--config.dataset=folder:/data/root',
            f'--config.weights={backbone if pretrained else None}',
            '--config.global_batch_size=64', *extra]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=flag_values,
                                    sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    train.check_config(config)
    for flag in extra:
      key, value = flag[len('--config.'):].split('=')
      assert str(config[key]) == value, name


def test_table_columns_from_the_report():
  accuracy = _import_accuracy()
  timing = dict(wall_seconds=10.0, cpu_seconds=9.0, other_cpu_fraction=0.0)
  scratch = dict(top1=0.5, macro_f1=0.4, ece=0.1, ece_calibrated=None,
                 **timing)
  calibrated = dict(top1=0.8, macro_f1=0.75, ece=0.125,
                    ece_calibrated=0.03125, **timing)
  lines = accuracy._table('t', [('from scratch', scratch),
                                ('calibrated', calibrated)],
                          scratch, 'from scratch').splitlines()
  header = [cell.strip() for cell in lines[1].split('|')[1:-1]]
  row = dict(zip(header, (cell.strip() for cell in lines[4].split('|')[1:-1])))
  assert row['macro-F1'] == '0.7500' and row['ECE'] == '0.1250'
  assert row['ECE after T'] == '0.0312'
  assert row['error ratio vs from scratch'] == '0.40'  # 0.2 / 0.5
  first = dict(zip(header, (cell.strip() for cell in lines[3].split('|')[1:-1])))
  assert first['ECE after T'] == ''


@pytest.mark.benchmark
def test_quick_mode_end_to_end(tmp_path):
  source = tmp_path / 'idx'
  source.mkdir()
  _write_fake_fashion_mnist(str(source))
  out = tmp_path / 'accuracy.json'
  result = subprocess.run(
      [sys.executable, SCRIPT, '--quick', f'--source_dir={source}',
       f'--data_dir={tmp_path / "data"}', f'--out={out}'],
      capture_output=True, text=True, timeout=900, cwd=conftest.REPO_ROOT,
      env=conftest.cli_env())
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'QUICK MODE' in result.stdout
  with open(out) as file:
    results = json.load(file)
  assert results['mode'] == 'quick'
  ours = results['from_scratch']['keras-sft (defaults)']
  assert ours['num_test'] == 100 and 0 <= ours['top1'] <= 1
  seed_row = results['from_scratch']['seed PyTorch loop']
  if importlib.util.find_spec('torch') and importlib.util.find_spec(
      'torchvision'):
    assert seed_row['num_train'] == 200 and seed_row['num_test'] == 100
  else:
    assert seed_row is None
    assert 'seed loop: SKIPPED' in result.stdout
  assert results['pretrain']['backbone']['num_weights'] > 300
  # Quick mode's one proxy row: calibration on the imbalanced variant.
  assert results['finetune_proxy'] == {}
  assert results['finetune_train_per_class'] == {
      'imbalanced': [20, 11, 6, 4, 2]}
  row = results['finetune_proxy_imbalanced']['calibration_split=val']
  assert 0 <= row['top1'] <= 1 and 0 <= row['macro_f1'] <= 1
  assert row['num_test'] == 100
  assert 0 <= row['ece'] <= 1 and 0 <= row['ece_calibrated'] <= 1
  assert row['temperature'] > 0
  assert '--config.calibration_split=val' in row['command']
  assert 'Fine-tuning proxy (imbalanced)' in result.stdout
  assert 'ECE after T' in result.stdout
  assert results['machine']['versions']['tensorflow']
