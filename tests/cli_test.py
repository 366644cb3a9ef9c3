"""Tests of keras_sft.cli: the command lines' answers to the user's mistakes.

Each user error ends with exit status 2, one `error:` line naming the
problem, and no traceback; `--help` loads no TensorFlow.
"""

import os
import subprocess
import sys

import pytest

import conftest


def _command(module, *flags):
  return subprocess.run([sys.executable, '-m', module, *flags],
                        capture_output=True, text=True, timeout=300,
                        cwd=conftest.REPO_ROOT, env=conftest.cli_env())


@pytest.mark.parametrize('module', ['keras_sft.main', 'keras_sft.export'])
def test_help_loads_no_tensorflow(module):
  code = (f'import sys; sys.argv = ["{module}", "--help"]\n'
          'import runpy\n'
          'try:\n'
          f'  runpy.run_module("{module}", run_name="__main__")\n'
          'except SystemExit:\n'
          '  pass\n'
          'print("LOADED", "tensorflow" in sys.modules,'
          ' "keras" in sys.modules)')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=120, cwd=conftest.REPO_ROOT,
                          env=conftest.cli_env())
  assert 'LOADED False False' in result.stdout, result.stdout + result.stderr
  assert '--workdir' in result.stdout


def test_export_command_runs_without_runpy_warning(tmp_path):
  result = _command('keras_sft.export', f'--workdir={tmp_path / "none"}')
  assert result.returncode == 2
  assert 'RuntimeWarning' not in result.stderr
  assert 'found in sys.modules' not in result.stderr
  assert 'error: ' in result.stderr and 'Traceback' not in result.stderr


def test_old_export_command_still_works_with_a_notice(tmp_path):
  result = _command('keras_sft.export_main', f'--workdir={tmp_path / "none"}')
  assert 'deprecated' in result.stderr and 'keras_sft.export' in result.stderr
  assert result.returncode == 2


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
