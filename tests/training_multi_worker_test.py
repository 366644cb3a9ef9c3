"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import conftest
from keras_sft.training import multi_worker
from keras_sft import workdir as workdir_lib

_WORKER = os.path.join(conftest.REPO_ROOT, 'tests', 'multi_worker_worker.py')


def _free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for sock in sockets:
    sock.bind(('127.0.0.1', 0))
  ports = [sock.getsockname()[1] for sock in sockets]
  for sock in sockets:
    sock.close()
  return ports


def _worker_envs():
  """The environments of 2 workers on free ports of 127.0.0.1."""
  hosts = [f'127.0.0.1:{port}' for port in _free_ports(2)]
  return [
      dict(conftest.cli_env(), TF_CONFIG=json.dumps(
          {'cluster': {'worker': hosts},
           'task': {'type': 'worker', 'index': index}}))
      for index in range(2)
  ]


def _run_workers(tmp_path, patch):
  processes = []
  for index, env in enumerate(_worker_envs()):
    command = [sys.executable, _WORKER, str(tmp_path / f'worker{index}.npz')]
    processes.append(subprocess.Popen(
        command + (['--patch'] if patch else []), env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=180)[0])
  finally:
    for process in processes:
      process.kill()
  return [process.returncode for process in processes], outputs


def _load(path):
  arrays = np.load(path)
  with open(path + '.json') as file:
    return [arrays[key] for key in sorted(arrays, key=lambda k: int(
        k.split('_')[1]))], json.load(file)


def test_version_guard():
  assert multi_worker.keras_version_is_affected('3.15.1')
  assert multi_worker.keras_version_is_affected('3.0.0')
  assert not multi_worker.keras_version_is_affected('2.15.0')
  assert not multi_worker.keras_version_is_affected('3.16.0')


def test_two_workers_match_one_process(tmp_path):
  """2 workers x 1 CPU = 1 process on the same global batches, to 1e-5."""
  codes, outputs = _run_workers(tmp_path, patch=True)
  assert codes == [0, 0], outputs
  subprocess.run([sys.executable, _WORKER, str(tmp_path / 'alone.npz')],
                 check=True, env=conftest.cli_env(), timeout=180,
                 capture_output=True)
  (weights0, logs0), (weights1, logs1), (alone, alone_logs) = (
      _load(str(tmp_path / name))
      for name in ('worker0.npz', 'worker1.npz', 'alone.npz'))
  for a, b, c in zip(weights0, weights1, alone):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=1e-5)
  for key in ('loss', 'ce', 'l2'):
    assert logs0[key] == logs1[key]
    np.testing.assert_allclose(logs0[key], alone_logs[key], rtol=1e-5)
  # Precise BN sets the same statistics on both workers, those of one
  # process over the same batches.
  statistics = [np.load(str(tmp_path / f'{name}.npz.bn.npz'))
                for name in ('worker0', 'worker1', 'alone')]
  for key in ('mean', 'variance'):
    np.testing.assert_array_equal(statistics[0][key], statistics[1][key])
    np.testing.assert_allclose(statistics[0][key], statistics[2][key],
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(statistics[2][key], 0.0 if key == 'mean' else 1.0)


@pytest.mark.skipif(not multi_worker.keras_version_is_affected(),
                    reason='Keras version outside the patched range.')
def test_upstream_keras_still_needs_the_patch(tmp_path):
  """Fails once keras-team/keras#20585 is fixed: then narrow the guard."""
  codes, outputs = _run_workers(tmp_path, patch=False)
  assert codes != [0, 0]
  assert any('PerReplica' in output for output in outputs), outputs


def _start_cli_workers(workdir, log_prefix):
  """Starts 2 CLI workers; their logs go to files (a full pipe would block)."""
  processes = []
  for index, env in enumerate(_worker_envs()):
    with open(f'{log_prefix}-worker{index}.log', 'w') as log:
      processes.append(subprocess.Popen(
          conftest.cli_command(workdir, *_CLI_FLAGS), env=env,
          cwd=conftest.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT))
  return processes


def _read(path):
  with open(path) as file:
    return file.read()


# BatchNorm in inference mode, so that each worker computes exactly what one
# process computes on its half of the batch. (Trained BN normalizes with the
# statistics of each worker's half; Keras' synchronized BN computes the
# variance as E[x²] − E[x]², which loses float32 digits on the large
# activations of a randomly initialized ResNet50.)
_BATCH_NORM = '--config.batch_norm=frozen'
_CLI_FLAGS = ('--config.distribution=multi_worker_mirrored', _BATCH_NORM,
              '--config.startup_timeout_seconds=120',
              '--config.collective_timeout_seconds=60')
_CHECKSUM = re.compile(r'Weights checksum \((worker \d)\) at step (\d+): (\S+)')


def test_cli_workers_survive_a_dead_worker_and_match_one_process(tmp_path):
  """Kill worker 1 mid-run; the chief fails instead of hanging; the rerun
  resumes from the chief's backup and ends where one process ends."""
  reference = str(tmp_path / 'one_process')
  conftest.run_cli(reference, _BATCH_NORM, '--config.export=False')
  workdir = str(tmp_path / 'run')
  first, second = str(tmp_path / 'first'), str(tmp_path / 'second')
  chief, worker = _start_cli_workers(workdir, first)
  pointer = conftest.backup_pointer(workdir)
  deadline = time.time() + 300
  try:
    while not os.path.exists(pointer) and time.time() < deadline:
      assert chief.poll() is None and worker.poll() is None, (
          _read(f'{first}-worker0.log')[-3000:])
      time.sleep(0.05)
    worker.kill()
    worker.wait()
    # The chief's next all-reduce fails (never a hang).
    chief.wait(timeout=180)
  finally:
    chief.kill()
    worker.kill()
  assert chief.returncode != 0
  killed_at = conftest.latest_backup(workdir)[1]
  assert killed_at < 4, 'the run finished before a worker could be killed'

  processes = _start_cli_workers(workdir, second)
  for process in processes:
    process.wait(timeout=600)
  logs = [_read(f'{second}-worker{index}.log') for index in range(2)]
  assert [process.returncode for process in processes] == [0, 0], (
      logs[0][-3000:], logs[1][-3000:])
  assert all(f'at step {killed_at}' in log for log in logs)
  # Both workers end with the same weights.
  checksums = [_CHECKSUM.findall(log) for log in logs]
  assert [c[0][:2] for c in checksums] == [('worker 0', '4'), ('worker 1', '4')]
  assert checksums[0][0][2] == checksums[1][0][2]
  assert conftest.read_metrics(workdir)['step'] == 4
  # Only the chief wrote: one line per start in train.log, all its own.
  with open(workdir_lib.Workdir(workdir).log_file) as file:
    starts = [line for line in file if 'Strategy ' in line]
  assert len(starts) == 2 and all('(worker 0)' in line for line in starts)
  assert sorted(os.listdir(workdir_lib.Workdir(workdir).export)) == ['1']
  resumed = conftest.backup_arrays(conftest.latest_backup(workdir)[0])
  expected = conftest.backup_arrays(conftest.latest_backup(reference)[0])
  assert resumed.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(resumed[name], expected[name], atol=1e-5,
                               err_msg=name)
