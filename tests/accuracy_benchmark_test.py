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


def test_read_idx_round_trip(tmp_path):
  sys.path.insert(0, os.path.dirname(SCRIPT))
  try:
    import accuracy  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  array = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
  _write_idx(str(tmp_path / 'x.gz'), array)
  np.testing.assert_array_equal(accuracy.read_idx(str(tmp_path / 'x.gz')),
                                array)
  rgb = accuracy.to_rgb32(array[1].astype(np.uint8))
  assert rgb.shape == (32, 32, 3)
  np.testing.assert_array_equal(rgb[2:30, 2:30, 1], array[1])
  assert rgb[:2].max() == 0


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
  assert 0 <= results['finetune_proxy']['fine-tuned']['top1'] <= 1
  assert results['machine']['versions']['tensorflow']
