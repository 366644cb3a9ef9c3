"""The launch scripts: usage errors and the TF_CONFIG they build."""

import json
import os
import re
import subprocess

import pytest

import conftest

_LAUNCH = os.path.join(conftest.REPO_ROOT, 'launch')


@pytest.mark.parametrize('script', ['local.sh', 'multi_gpu.sh', 'tpu_vm.sh',
                                    'multi_machine.sh'])
def test_missing_arguments_print_usage(script):
  result = subprocess.run(['bash', os.path.join(_LAUNCH, script)],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2
  assert 'usage:' in result.stderr


def test_multi_machine_builds_tf_config_from_hosts_and_index():
  env = dict(conftest.cli_env(), HOSTS='10.0.0.1:2222,10.0.0.2:2222',
             INDEX='1', DRY_RUN='1')
  result = subprocess.run(
      ['bash', os.path.join(_LAUNCH, 'multi_machine.sh'), 'c.py', 'w',
       '--config.seed=3'], capture_output=True, text=True, timeout=60,
      env=env)
  assert result.returncode == 0, result.stderr
  line = next(line for line in result.stderr.splitlines()
              if line.startswith('TF_CONFIG='))
  assert json.loads(line[len('TF_CONFIG='):]) == {
      'cluster': {'worker': ['10.0.0.1:2222', '10.0.0.2:2222']},
      'task': {'type': 'worker', 'index': 1}}
  assert result.stdout.split() == [
      'python', '-m', 'keras_sft.main', '--config=c.py', '--workdir=w',
      '--config.distribution=multi_worker_mirrored', '--config.seed=3']


def test_no_launch_script_documents_an_object_storage_workdir():
  """tpu_vm.sh documented gs://bucket/runs/c10, which the workdir refuses."""
  for name in os.listdir(_LAUNCH):
    with open(os.path.join(_LAUNCH, name)) as file:
      text = file.read()
    assert not re.search(r'\.sh\s+\S+\s+[a-z]+://', text), name
