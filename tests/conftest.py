"""Shared test setup: 2 logical CPU devices, no network, mock tfds data."""

import csv
import json
import os
import socket
import subprocess
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from keras_sft import workdir as workdir_lib

# MirroredStrategy tests need two replicas; split the CPU before TF
# initializes its devices (tests that use no strategy still run on /cpu:0).
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices('CPU')[0],
    [tf.config.LogicalDeviceConfiguration()] * 2)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_real_connect = socket.socket.connect


def _loopback_only_connect(self, address):
  host = address[0] if isinstance(address, tuple) else address
  if isinstance(host, str) and not (host.startswith('127.') or
                                    host in ('localhost', '::1')) and (
                                         self.family != socket.AF_UNIX):
    raise OSError(f'Tests must not touch the network (tried {address!r}).')
  return _real_connect(self, address)


@pytest.fixture(autouse=True)
def fresh_collective_keys():
  """Gives each test's MirroredStrategy collective keys of its own.

  TensorFlow caches a collective's parameters (its shape) by group and
  instance key, and every strategy made in a process starts from the same
  keys (`_collective_key_base`, which TensorFlow says to set only in
  tests). So the all-reduce of a second strategy's variables of other
  shapes failed with "Shape mismatch in the collective instance", depending
  on which tests had run before in the same process.
  """
  tf.distribute.MirroredStrategy._collective_key_base += 100_000  # pylint: disable=protected-access
  yield


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Fails any test that opens a connection off this machine."""
  monkeypatch.setattr(socket.socket, 'connect', _loopback_only_connect)
  monkeypatch.setattr(socket, 'getaddrinfo', _no_dns(socket.getaddrinfo))
  # tfds reaches GCS through TF's own file system, below Python's sockets.
  from tensorflow_datasets.core.utils import gcs_utils  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gcs_utils, '_is_gcs_disabled', True)


def _no_dns(real_getaddrinfo):

  def getaddrinfo(host, *args, **kwargs):
    if host not in (None, 'localhost', '127.0.0.1', '::1'):
      raise socket.gaierror(f'Tests must not resolve {host!r}.')
    return real_getaddrinfo(host, *args, **kwargs)

  return getaddrinfo


@pytest.fixture
def mock_cifar10():
  """tfds mock data: 64 random 32x32x3 uint8 images per split, 10 classes."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=64):
    yield


def run_cli(workdir, *flags, check=True, timeout=600, env=None):
  """Runs `python -m keras_sft.main` on tfds mock data in a subprocess."""
  command = cli_command(workdir, *flags)
  result = subprocess.run(command, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT,
                          env=env or cli_env())
  if check and result.returncode:
    raise AssertionError(f'{command} exited {result.returncode}:\n'
                         f'{result.stderr[-5000:]}')
  return result


def cli_command(workdir, *flags):
  return [sys.executable, os.path.join(REPO_ROOT, 'tests', 'mock_cli.py'),
          '--config=configs/cifar10_resnet50.py:smoke',
          f'--workdir={workdir}', *flags]


def cli_env():
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory):
  """The smoke config trained to the end once, through the real CLI."""
  workdir = str(tmp_path_factory.mktemp('smoke') / 'run')
  result = run_cli(workdir)
  return workdir, result


def read_metrics(workdir):
  """The run's metrics.json."""
  with open(workdir_lib.Workdir(workdir).metrics_file) as file:
    return json.load(file)


def history_rows(workdir):
  """The run's history.csv, one dict per epoch."""
  with open(workdir_lib.Workdir(workdir).history_csv) as file:
    return list(csv.DictReader(file))


def version_dir(workdir, version=1):
  """`<workdir>/export/<version>`: a SavedModel version of the run."""
  return os.path.join(workdir_lib.Workdir(workdir).export, str(version))


def backup_pointer(workdir):
  """The run's `checkpoint.json`, which names its newest backup."""
  return os.path.join(workdir_lib.Workdir(workdir).checkpoints,
                      'checkpoint.json')


def latest_backup(workdir):
  """`(path, step)` of the run's newest backup."""
  directory = workdir_lib.Workdir(workdir).checkpoints
  with open(os.path.join(directory, 'checkpoint.json')) as file:
    state = json.load(file)
  return os.path.join(directory, state['file']), state['step']


def backup_arrays(path):
  """Every array of a `.weights.h5` backup, by its path in the file."""
  import h5py  # pylint: disable=g-import-not-at-top
  arrays = {}
  with h5py.File(path, 'r') as file:
    file.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                    if isinstance(item, h5py.Dataset) else None)
  return arrays
