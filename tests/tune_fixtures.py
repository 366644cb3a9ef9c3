"""What the tune tests share: a tiny study command, its data, its reading."""

import os
import subprocess
import sys

import conftest
import image_fixtures

# Two keys, so TPE and the report have something to vary; cheap values.
SPACE = '''
def get_space():
  return {'learning_rate': {'low': 1e-3, 'high': 0.1, 'log': True},
          'random_flip': {'choices': [True, False]}}
'''


def write_space(directory, text=SPACE):
  path = os.path.join(directory, 'space.py')
  with open(path, 'w') as file:
    file.write(text)
  return path


def write_folder(directory):
  """An image folder: 3 classes, 4 train + 2 test images each."""
  root = os.path.join(directory, 'images')
  image_fixtures.write_image_folder(root)
  return root


def tune_command(workdir, folder, space, *flags, harness=False):
  """The study command on the smoke config: 32px, random weights, batch 4,
  2 steps per epoch; 1 of 4 train images per class scores the trials."""
  entry = ([os.path.join(conftest.REPO_ROOT, 'tests', 'tune_harness.py')]
           if harness else ['-m', 'keras_sft.tune'])
  return [sys.executable, *entry,
          '--config=configs/cifar10_resnet50.py:smoke',
          f'--workdir={workdir}', f'--space={space}',
          f'--config.dataset=folder:{folder}',
          '--config.global_batch_size=4', '--config.eval_steps=1',
          '--validation_fraction=0.25', *flags]


def start(command, env=None, log=None):
  return subprocess.Popen(command, cwd=conftest.REPO_ROOT,
                          env=env or conftest.cli_env(), text=True,
                          stdout=log or subprocess.PIPE,
                          stderr=subprocess.STDOUT)


def run(command, env=None, timeout=600):
  result = subprocess.run(command, cwd=conftest.REPO_ROOT,
                          env=env or conftest.cli_env(), text=True,
                          capture_output=True, timeout=timeout)
  if result.returncode:
    raise AssertionError(f'{command} exited {result.returncode}:\n'
                         f'{result.stdout[-3000:]}\n{result.stderr[-5000:]}')
  return result


def load_study(workdir, storage=None):
  import optuna  # pylint: disable=g-import-not-at-top
  from keras_sft.tune import storage as storage_lib  # pylint: disable=g-import-not-at-top
  return optuna.load_study(
      study_name=os.path.basename(os.path.abspath(workdir)),
      storage=storage_lib.open_storage(storage, workdir, 120))


def run_numbers(study):
  """The workdir number of every trial that ran (retries share one)."""
  from keras_sft.tune import trial as trial_lib  # pylint: disable=g-import-not-at-top
  return [trial_lib.trial_number_of_run(trial) for trial in study.trials]
