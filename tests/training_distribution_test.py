"""Tests of strategy selection, TF_CONFIG checks, the chief and peer waits."""

import json
import socket
import time
import types

import pytest
import tensorflow as tf

import conftest
from keras_sft.training import distribution
from keras_sft.training import multi_worker


def _tf_config(hosts, index, job='worker'):
  return json.dumps({'cluster': {job: hosts},
                     'task': {'type': job, 'index': index}})


@pytest.mark.parametrize('text, message', [
    ('{not json', 'not valid JSON'),
    ('{"task": {"type": "worker", "index": 0}}', 'needs a "cluster"'),
    ('{"cluster": {"worker": ["a:1"]}}', 'needs a "task"'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", '
     '"index": 0}}', "task type 'chief' is not in its cluster"),
    (_tf_config(['a:1', 'b:2'], 2), 'task index 2 is out of range'),
])
def test_bad_tf_config_is_named(text, message):
  with pytest.raises(ValueError, match=message) as error:
    distribution.read_tf_config({'TF_CONFIG': text})
  assert text in str(error.value)


def test_good_tf_config_is_returned():
  config = distribution.read_tf_config(
      {'TF_CONFIG': _tf_config(['a:1', 'b:2'], 1)})
  assert config['task'] == {'type': 'worker', 'index': 1}
  assert distribution.read_tf_config({}) is None


def test_auto_picks_multi_worker_from_tf_config(monkeypatch):
  monkeypatch.delenv('TPU_NAME', raising=False)
  monkeypatch.delenv('TF_CONFIG', raising=False)
  assert distribution.resolve_auto() == 'default'  # No GPU on this machine.
  monkeypatch.setenv('TF_CONFIG', _tf_config(['a:1'], 0))
  assert distribution.resolve_auto() == 'default'  # One task is no cluster.
  monkeypatch.setenv('TF_CONFIG', _tf_config(['a:1', 'b:2'], 0))
  assert distribution.resolve_auto() == 'multi_worker_mirrored'
  monkeypatch.setenv('TPU_NAME', 'my-tpu')
  assert distribution.resolve_auto() == 'tpu'


def test_unknown_strategy_and_missing_tf_config(monkeypatch):
  with pytest.raises(ValueError, match="distribution='horovod'"):
    distribution.create_strategy('horovod')
  monkeypatch.delenv('TF_CONFIG', raising=False)
  with pytest.raises(ValueError, match='needs \\$TF_CONFIG'):
    distribution.create_strategy('multi_worker_mirrored')


def _strategy_of(task_type, task_id, jobs):
  spec = tf.train.ClusterSpec({job: ['h:1'] * count
                               for job, count in jobs.items()})
  resolver = types.SimpleNamespace(task_type=task_type, task_id=task_id,
                                   cluster_spec=lambda: spec)
  return types.SimpleNamespace(cluster_resolver=resolver)


def test_chief_is_the_chief_task_else_worker_0():
  assert distribution.is_chief(tf.distribute.get_strategy())
  assert distribution.is_chief(_strategy_of('worker', 0, {'worker': 2}))
  assert not distribution.is_chief(_strategy_of('worker', 1, {'worker': 2}))
  with_chief = {'chief': 1, 'worker': 2}
  assert distribution.is_chief(_strategy_of('chief', 0, with_chief))
  assert not distribution.is_chief(_strategy_of('worker', 0, with_chief))
  assert distribution.task_name(_strategy_of('worker', 1, {'worker': 2})) == (
      'worker 1')


def _free_port():
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def test_wait_for_peers_names_a_peer_that_never_starts():
  own, missing = (f'127.0.0.1:{_free_port()}' for _ in range(2))
  start = time.monotonic()
  with pytest.raises(TimeoutError, match=missing):
    multi_worker.wait_for_peers(own, [own, missing], timeout_seconds=1,
                                poll_seconds=0.1)
  assert time.monotonic() - start < 10


def test_wait_for_peers_returns_once_every_peer_listens():
  with socket.socket() as peer:
    peer.bind(('127.0.0.1', 0))
    peer.listen()
    peer_host = f'127.0.0.1:{peer.getsockname()[1]}'
    own = f'127.0.0.1:{_free_port()}'
    multi_worker.wait_for_peers(own, [own, peer_host], timeout_seconds=5)


def test_cli_with_unreachable_peer_fails_within_its_timeout(tmp_path):
  """A worker whose peer never starts ends with an error, never a hang."""
  hosts = [f'127.0.0.1:{_free_port()}' for _ in range(2)]
  start = time.monotonic()
  result = conftest.run_cli(
      str(tmp_path / 'run'), '--config.distribution=multi_worker_mirrored',
      '--config.startup_timeout_seconds=3', check=False, timeout=120,
      env=dict(conftest.cli_env(), TF_CONFIG=_tf_config(hosts, 0)))
  assert result.returncode != 0
  assert 'did not start within 3 s' in result.stderr
  assert hosts[1] in result.stderr
  assert time.monotonic() - start < 60


def test_cli_with_bad_tf_config_fails_fast(tmp_path):
  result = conftest.run_cli(
      str(tmp_path / 'run'), '--config.distribution=multi_worker_mirrored',
      check=False, timeout=120,
      env=dict(conftest.cli_env(), TF_CONFIG='{"cluster": '))
  assert result.returncode != 0
  assert 'TF_CONFIG is not valid JSON' in result.stderr


def test_runs_in_one_process_share_one_strategy_of_a_kind():
  """Self-training's teacher and student (and tuning trials) run one after
  another in a process: a second MirroredStrategy reused the first one's
  collective instance keys and its first all-reduce was rejected."""
  first = distribution.create_strategy('mirrored')
  assert distribution.create_strategy('mirrored') is first
  assert distribution.create_strategy('one_device') is not first
