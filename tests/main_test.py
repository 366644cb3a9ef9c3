"""End-to-end tests of the command line on tfds mock data."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

import conftest

from keras_sft import workdir as workdir_lib


def test_smoke_run_trains_backs_up_evaluates_and_exports(smoke_run):
  """The smoke command writes every artifact of a run into the workdir."""
  workdir, result = smoke_run
  run = workdir_lib.Workdir(workdir)
  for path in (run.config_file, run.log_file, run.history_csv,
               run.metrics_file, run.dataset_file, run.confusion_matrix_png,
               run.curves_png,
               os.path.join(run.checkpoints, 'checkpoint.json'),
               os.path.join(run.checkpoints, 'best.weights.h5'),
               os.path.join(run.export, '1', 'saved_model.pb'),
               os.path.join(run.tensorboard, 'train')):
    assert os.path.exists(path), path
  metrics = conftest.read_metrics(workdir)
  # smoke: 2 epochs x 2 steps.
  assert metrics['step'] == metrics['total_steps'] == 4
  for key in ('loss', 'ce', 'l2', 'accuracy', 'top5'):
    assert np.isfinite(metrics['eval'][key]), key
  assert len(conftest.history_rows(workdir)) == 2
  assert conftest.latest_backup(workdir)[1] == 4
  with open(workdir_lib.Workdir(workdir).log_file) as file:
    log = file.read()
  # ResNet50 has 53 convolutions; the head adds one Dense kernel.
  assert 'L2 weight decay' in log and 'on 54 kernels' in log
  assert 'Strategy _DefaultDistributionStrategy (local): 1 replica(s)' in log
  with open(workdir_lib.Workdir(workdir).dataset_file) as file:
    assert json.load(file)['class_names'] == [str(i) for i in range(10)]
  del result


def test_best_weights_are_those_of_the_best_val_accuracy_epoch(smoke_run):
  workdir, _ = smoke_run
  checkpoints = workdir_lib.Workdir(workdir).checkpoints
  with open(os.path.join(checkpoints, 'best.json')) as file:
    best = json.load(file)
  rows = conftest.history_rows(workdir)
  accuracies = [float(row['val_accuracy']) for row in rows]
  assert best['value'] == pytest.approx(max(accuracies))
  # The first epoch reaching the best value (ties keep the earlier one);
  # smoke: 2 steps per epoch.
  assert best['step'] == 2 * (accuracies.index(max(accuracies)) + 1)
  saved = conftest.backup_arrays(os.path.join(checkpoints, 'best.weights.h5'))
  # The optimizer's first variable is its step counter.
  assert int(saved['optimizer/vars/0']) == best['step']
  last = conftest.backup_arrays(conftest.latest_backup(workdir)[0])
  assert saved.keys() == last.keys()


def test_same_command_again_resumes_instead_of_starting_over(smoke_run,
                                                             tmp_path):
  """A finished run rerun with the same command neither retrains nor fails."""
  workdir, _ = smoke_run
  before = conftest.backup_arrays(conftest.latest_backup(workdir)[0])
  result = conftest.run_cli(workdir)
  assert 'already finished its 4 steps' in result.stderr
  assert conftest.read_metrics(workdir)['step'] == 4
  assert len(conftest.history_rows(workdir)) == 2
  # The run had exported already: no second version.
  assert sorted(os.listdir(workdir_lib.Workdir(workdir).export)) == ['1']
  after = conftest.backup_arrays(conftest.latest_backup(workdir)[0])
  assert before.keys() == after.keys()
  for name in before:
    np.testing.assert_array_equal(before[name], after[name])


def test_killed_run_resumes_to_the_same_weights(smoke_run, tmp_path):
  """SIGKILL mid-epoch, rerun: same optimizer steps, same final weights."""
  reference, _ = smoke_run
  workdir = str(tmp_path / 'run')
  process = subprocess.Popen(
      conftest.cli_command(workdir), cwd=conftest.REPO_ROOT,
      env=conftest.cli_env(), stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  pointer = conftest.backup_pointer(workdir)
  deadline = time.time() + 300
  while not os.path.exists(pointer) and time.time() < deadline:
    assert process.poll() is None, 'the run ended before its first backup'
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = conftest.latest_backup(workdir)[1]
  assert killed_at < 4, 'the run finished before it could be killed'
  assert not os.path.exists(workdir_lib.Workdir(workdir).metrics_file)

  result = conftest.run_cli(workdir)

  assert f'at step {killed_at}' in result.stderr
  assert conftest.read_metrics(workdir)['step'] == 4
  resumed, expected = (conftest.backup_arrays(conftest.latest_backup(w)[0])
                       for w in (workdir, reference))
  assert resumed.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(resumed[name], expected[name], atol=1e-5,
                               err_msg=name)


def test_unknown_config_key_is_an_error(tmp_path):
  result = conftest.run_cli(str(tmp_path / 'run'), '--config.num_epoch=3',
                            check=False, timeout=120)
  assert result.returncode != 0
  assert 'num_epoch' in result.stderr
  assert not os.path.exists(tmp_path / 'run')


def test_bad_value_fails_before_any_model_is_built(tmp_path):
  result = conftest.run_cli(str(tmp_path / 'run'), '--config.image_size=0',
                            check=False, timeout=120)
  assert result.returncode != 0
  assert 'image_size=0' in result.stderr
  assert 'Built ResNet50' not in result.stderr


def test_every_recipe_switch_together_trains_evaluates_and_exports(tmp_path):
  """All recipe switches at once through the CLI (no accuracy claim)."""
  workdir = str(tmp_path / 'run')
  recipe_flags = (
      '--config.mixup_alpha=0.2', '--config.cutmix_alpha=1.0',
      '--config.randaugment_num_ops=2', '--config.randaugment_magnitude=0.5',
      '--config.label_smoothing=0.1', '--config.precision=mixed_bfloat16',
      '--config.ema_momentum=0.9', '--config.batch_norm=frozen',
      '--config.head_only_epochs=1', '--config.freeze_until=conv2',
      '--config.backbone_learning_rate_multiplier=0.1',
      '--config.lr_schedule=step', '--config.resize_size=40')
  result = conftest.run_cli(workdir, *recipe_flags)
  assert 'Dtype policy: mixed_bfloat16' in result.stderr
  assert 'up to stage conv2' in result.stderr
  assert 'head-only steps 2' in result.stderr
  metrics = conftest.read_metrics(workdir)
  assert metrics['step'] == 4
  assert np.isfinite(metrics['eval']['loss'])
  assert os.listdir(workdir_lib.Workdir(workdir).export) == ['1']
  # Exporting the run later rebuilds the same model (frozen layers, BN, EMA
  # slots) and gives the EMA weights, as the end-of-run export did.
  from keras_sft.export import restore  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  model, _, _, _ = restore.restore_run_model(workdir, 'last')
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3),
                                             dtype=np.uint8)
  served = tf.saved_model.load(conftest.version_dir(workdir))
  logits = served.signatures['serving_default'](
      images=tf.constant(images))['logits'].numpy()
  np.testing.assert_allclose(model.predict(images, verbose=0), logits,
                             rtol=0.02, atol=0.02)
  # --mode=evaluate builds the same model again and evaluates the same
  # (EMA) weights as the end of training did.
  trained = conftest.read_metrics(workdir)
  evaluated = conftest.run_cli(workdir, *recipe_flags, '--mode=evaluate')
  assert 'Evaluating the backup at step 4 of 4' in evaluated.stderr
  again = conftest.read_metrics(workdir)
  for key in ('loss', 'accuracy'):
    assert again['eval'][key] == pytest.approx(trained['eval'][key],
                                               rel=1e-4), key


def test_sigterm_writes_a_backup_and_exits_with_the_retry_status(tmp_path):
  """What a cluster sends before preemption: backup, then exit 143."""
  workdir = str(tmp_path / 'run')
  # One epoch of 8 steps, backups only at its end, a line per step.
  process = subprocess.Popen(
      conftest.cli_command(workdir, '--config.num_epochs=1',
                           '--config.steps_per_epoch=8',
                           '--config.checkpoint_every_steps=1000',
                           '--config.log_every_steps=1'),
      cwd=conftest.REPO_ROOT, env=conftest.cli_env(),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in process.stderr:
    lines.append(line)
    if 'Step 1/8' in line:
      process.send_signal(signal.SIGTERM)
      break
  lines += process.stderr.readlines()
  assert process.wait(timeout=300) == 143, ''.join(lines[-30:])
  stderr = ''.join(lines)
  path, step = conftest.latest_backup(workdir)
  assert 1 <= step < 8  # No other backup before the epoch end (8).
  assert f'preempted: stopped on SIGTERM at step {step}' in stderr
  # The backup holds that step (the model's step counter).
  assert int(conftest.backup_arrays(path)['vars/0']) == step
  assert not os.path.exists(os.path.join(workdir, 'metrics.json'))
  assert not os.path.exists(os.path.join(workdir, 'export'))
  assert not [name for directory, _, names in os.walk(workdir)
              for name in names + [directory]
              if '.tmp' in os.path.basename(name)]
