"""Tests of keras_sft.cli: the command lines' answers to the user's mistakes.

Each user error ends with exit status 2, one `error:` line naming the
problem, and no traceback; `--help` loads no TensorFlow.
"""

import os
import shutil
import subprocess
import sys

import pytest

import conftest


def _command(module, *flags):
  return subprocess.run([sys.executable, '-m', module, *flags],
                        capture_output=True, text=True, timeout=300,
                        cwd=conftest.REPO_ROOT, env=conftest.cli_env())


@pytest.mark.parametrize('module, flag', [
    ('keras_sft.main', '--workdir'), ('keras_sft.export', '--workdir'),
    ('keras_sft.predict', '--model')])
def test_help_exits_0_and_loads_no_tensorflow(module, flag):
  """absl's --help exits 1, the status of a diverged run: here 0."""
  code = (f'import sys; sys.argv = ["{module}", "--help"]\n'
          'import runpy\n'
          'status = "none"\n'
          'try:\n'
          f'  runpy.run_module("{module}", run_name="__main__")\n'
          'except SystemExit as exit_:\n'
          '  status = exit_.code\n'
          'print("LOADED", "tensorflow" in sys.modules,'
          ' "keras" in sys.modules, "STATUS", status)')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=120, cwd=conftest.REPO_ROOT,
                          env=conftest.cli_env())
  assert 'LOADED False False STATUS 0' in result.stdout, (
      result.stdout[-3000:] + result.stderr)
  assert flag in result.stdout


def test_another_keras_backend_is_one_error_line(tmp_path):
  """KERAS_BACKEND=jax ended in a traceback from Keras' backend import."""
  result = subprocess.run(
      [sys.executable, '-m', 'keras_sft.main',
       '--config=configs/cifar10_resnet50.py:smoke',
       f'--workdir={tmp_path / "run"}'], capture_output=True, text=True,
      timeout=120, cwd=conftest.REPO_ROOT,
      env=dict(conftest.cli_env(), KERAS_BACKEND='jax'))
  assert result.returncode == 2, result.stderr[-3000:]
  assert not os.path.exists(tmp_path / 'run')
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  [line] = _error_lines(result.stderr)
  assert "KERAS_BACKEND='jax'" in line and 'tensorflow' in line, line


def test_export_command_runs_without_runpy_warning(tmp_path):
  result = _command('keras_sft.export', f'--workdir={tmp_path / "none"}')
  assert result.returncode == 2
  assert 'RuntimeWarning' not in result.stderr
  assert 'found in sys.modules' not in result.stderr
  assert 'error: ' in result.stderr and 'Traceback' not in result.stderr


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith('error: ')]


@pytest.mark.parametrize('flag, expected', [
    ('--config.num_epoch=3', 'num_epochs'),
    ('--config.image_size=0', 'image_size=0'),
    # Was a numpy MemoryError traceback after the workdir was claimed.
    ('--config.image_size=100000000', 'image_size=100000000'),
    ('--config.global_batch_size=-8', 'global_batch_size=-8'),
    ('--config.learning_rate=nan', 'learning_rate=nan'),
    ('--config.dataset=no_such_dataset', 'no_such_dataset'),
    ('--config.dataset=folder:/no/such/folder', '/no/such/folder'),
    ('--config.weights=/no/such/weights.h5', '/no/such/weights.h5'),
    ('--config=configs/no_such_config.py', 'no_such_config.py'),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, flag,
                                                    expected):
  result = conftest.run_cli(str(tmp_path / 'run'), flag, check=False,
                            timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  lines = _error_lines(result.stderr)
  assert len(lines) == 1 and expected in result.stderr, result.stderr[-3000:]
  assert not os.path.exists(tmp_path / 'run')


def test_workdir_of_another_run_is_one_error_line(smoke_run, tmp_path):
  workdir, _ = smoke_run
  result = conftest.run_cli(workdir, '--config.learning_rate=0.5',
                            check=False, timeout=300)
  assert result.returncode == 2
  assert 'Traceback' not in result.stderr
  [line] = _error_lines(result.stderr)
  assert 'holds another run' in line and 'learning_rate' in line


def test_verbose_shows_the_traceback_of_a_user_error(tmp_path):
  result = conftest.run_cli(str(tmp_path / 'run'), '--config.image_size=0',
                            '--verbose', check=False, timeout=300)
  assert result.returncode != 0
  assert 'Traceback' in result.stderr and 'image_size=0' in result.stderr


@pytest.mark.parametrize('module, flags, expected', [
    ('keras_sft.main', ['--config.precise_bn_batches=1.5'], '1.5'),
    ('keras_sft.main', ['--config.max_image_pixels=nan'], 'nan'),
    ('keras_sft.main', ['--no_such_flag=1'], 'no_such_flag'),
    ('keras_sft.export', ['--checkpoint=newest'], 'newest'),
])
def test_flag_parsing_errors_are_one_line_with_status_2(tmp_path, module,
                                                        flags, expected):
  workdir = tmp_path / 'run'
  result = _command(module, '--config=configs/cifar10_resnet50.py:smoke'
                    if module == 'keras_sft.main' else '--top_k=1',
                    f'--workdir={workdir}', *flags)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  [line] = _error_lines(result.stderr)
  assert expected in line, result.stderr
  assert 'FATAL' not in result.stderr
  assert not os.path.exists(workdir)


def test_a_write_that_does_not_fit_is_one_error_line(smoke_run, tmp_path):
  """Export under a file-size limit (EFBIG, as ENOSPC on a full disk)."""
  import resource  # pylint: disable=g-import-not-at-top

  def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

  export_base = tmp_path / 'export'
  result = subprocess.run(
      [sys.executable, '-m', 'keras_sft.export', f'--workdir={smoke_run[0]}',
       f'--export_base={export_base}'],
      capture_output=True, text=True, timeout=300, cwd=conftest.REPO_ROOT,
      env=conftest.cli_env(), preexec_fn=limit_file_size)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  [line] = _error_lines(result.stderr)
  assert 'File too large' in line and 'rerun' in line, line
  # No version was taken by the export that did not fit.
  assert not export_base.exists() or not [
      name for name in os.listdir(export_base) if name.isdigit()]


def _command_elsewhere(cwd, module, *flags):
  """`module` run from `cwd`: on tfds mock data if it is keras_sft.main."""
  if module == 'keras_sft.main':
    command = [sys.executable, os.path.join(conftest.REPO_ROOT, 'tests',
                                            'mock_cli.py'),
               '--config=' + os.path.join(conftest.REPO_ROOT, 'configs',
                                          'cifar10_resnet50.py:smoke')]
  else:
    command = [sys.executable, '-m', module]
  return subprocess.run(command + list(flags), capture_output=True,
                        text=True, timeout=300, cwd=cwd,
                        env=dict(conftest.cli_env(),
                                 PYTHONPATH=conftest.REPO_ROOT))


@pytest.mark.parametrize('module', ['keras_sft.main', 'keras_sft.export'])
def test_a_workdir_that_is_a_file_is_one_error_line(tmp_path, module):
  """A file as --workdir (or above it) ended in a FileExistsError traceback."""
  (tmp_path / 'notes.txt').write_text('not a folder')
  for workdir in ('notes.txt', os.path.join('notes.txt', 'run')):
    result = _command_elsewhere(tmp_path, module, f'--workdir={workdir}')
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    [line] = _error_lines(result.stderr)
    assert f"workdir='{workdir}'" in line and 'not a folder' in line, line
  assert (tmp_path / 'notes.txt').read_text() == 'not a folder'


@pytest.mark.parametrize('module', ['keras_sft.main', 'keras_sft.export'])
def test_a_workdir_in_object_storage_is_refused_naming_the_route(tmp_path,
                                                                 module):
  """launch/tpu_vm.sh documented gs://bucket/runs/c10, which cannot work.

  The workdir's lock (flock), atomic writes (rename) and free-space checks
  are local-file APIs: `ram://runs/c10` trained into the local folder
  `ram:/runs/c10`.
  """
  result = _command_elsewhere(tmp_path, module, '--workdir=ram://runs/c10')
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  [line] = _error_lines(result.stderr)
  assert "workdir='ram://runs/c10'" in line, line
  assert 'local disk' in line and 'gsutil -m cp -r' in line, line
  assert os.listdir(tmp_path) == []


def test_configs_load_from_any_directory_and_any_path(tmp_path):
  """`--config=/path/to/repo/configs/...` from elsewhere, or a copied config.

  The experiment configs imported `configs.default`, found only when the
  command ran in the repository: ModuleNotFoundError: No module named
  'configs'.
  """
  project = tmp_path / 'my_project'
  project.mkdir()
  shutil.copy(os.path.join(conftest.REPO_ROOT, 'configs',
                           'cifar10_resnet50_cpu.py'), project / 'mine.py')
  code = ('from absl import flags\n'
          'from ml_collections import config_flags\n'
          'import sys\n'
          'config = config_flags.DEFINE_config_file("config")\n'
          'for path in sys.argv[1:]:\n'
          '  flags.FLAGS.unparse_flags()\n'
          '  flags.FLAGS(["x", "--config=" + path])\n'
          '  print("IMAGE_SIZE", config.value.image_size)\n')
  configs = os.path.join(conftest.REPO_ROOT, 'configs')
  result = subprocess.run(
      [sys.executable, '-c', code,
       os.path.join(configs, 'cifar10_resnet50.py') + ':smoke',
       os.path.join(configs, 'default.py'), str(project / 'mine.py')],
      capture_output=True, text=True, timeout=120, cwd=tmp_path,
      env={key: value for key, value in conftest.cli_env().items()
           if key != 'PYTHONPATH'})
  assert result.stdout.split('\n')[:3] == [
      'IMAGE_SIZE 32', 'IMAGE_SIZE 224', 'IMAGE_SIZE 32'], (
          result.stdout + result.stderr[-3000:])


def test_a_config_written_for_0_1_is_one_error_line_naming_the_upgrade(
    tmp_path):
  """The hostile pass ran 0.1.0's own config: an ImportError traceback."""
  config = tmp_path / 'old_config.py'
  config.write_text('from keras_sft import hyperrule\n'
                    'from configs import default as default_lib\n'
                    'def get_config():\n'
                    '  return default_lib.get_config()\n')
  result = _command('keras_sft.main', f'--config={config}',
                    f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr
  assert ("cannot import name 'hyperrule'" in result.stderr and
          'Upgrading from 0.1' in result.stderr), result.stderr
  assert not (tmp_path / 'run').exists()
