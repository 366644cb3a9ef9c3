"""Two workers share one study (the journal file in the workdir): every
trial runs once, the report is written, the test split is read only by the
final run, and the best trial reruns as an ordinary run to the same score.
A pruned trial stops after its first epoch."""

import csv
import json
import os
import re
import shlex
import shutil
import sys
import threading
import time

import optuna
import pytest

import conftest
import tune_fixtures

from configs import cifar10_resnet50
from keras_sft.tune import report
from keras_sft.tune import space as space_lib
from keras_sft.tune import study as study_lib
from keras_sft.tune import trial as trial_lib

TRIALS = 2


@pytest.fixture(scope='module')
def shared_study(tmp_path_factory):
  """2 trials by 2 worker processes started together, then the final run."""
  directory = str(tmp_path_factory.mktemp('tune'))
  folder = tune_fixtures.write_folder(directory)
  space = tune_fixtures.write_space(directory)
  workdir = os.path.join(directory, 'study')
  access_log = os.path.join(directory, 'access.log')
  env = dict(conftest.cli_env(), TUNE_ACCESS_LOG=access_log)
  command = tune_fixtures.tune_command(workdir, folder, space,
                                       f'--trials={TRIALS}', harness=True)
  workers = [tune_fixtures.start(command, env) for _ in range(2)]
  outputs = [worker.communicate(timeout=900)[0] for worker in workers]
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-5000:]
  yield workdir, folder, access_log, outputs
  # ~2.3 GB of trial backups: a module's directory is otherwise kept to the
  # session's end (setup.cfg's retention policy covers tmp_path only).
  shutil.rmtree(directory, ignore_errors=True)


def test_two_workers_run_every_trial_once(shared_study):
  workdir, _, _, outputs = shared_study
  study = tune_fixtures.load_study(workdir)
  trials = study.trials
  assert len(trials) == TRIALS
  assert all(trial.state in (optuna.trial.TrialState.COMPLETE,
                             optuna.trial.TrialState.PRUNED)
             for trial in trials), [trial.state for trial in trials]
  assert sorted(tune_fixtures.run_numbers(study)) == list(range(TRIALS))
  # Both workers took trials.
  assert len({trial.user_attrs['worker'] for trial in trials}) == 2
  for number in range(TRIALS):
    with open(os.path.join(workdir, 'trials', str(number), 'train.log')) as f:
      # One start per trial workdir: no trial ran twice.
      assert f.read().count('INFO Strategy ') == 1
  # Trial 0 ran the config's own values.
  assert trials[0].params['learning_rate'] == 0.01
  assert trials[0].user_attrs[study_lib.DEFAULTS_ATTR]
  assert sum('Trial 0 of 2 starts' in output for output in outputs) == 1


def test_the_report_is_written(shared_study):
  workdir, _, _, outputs = shared_study
  with open(os.path.join(workdir, report.LEADERBOARD)) as file:
    rows = list(csv.DictReader(file))
  assert sorted(int(row['trial']) for row in rows) == list(range(TRIALS))
  for column in ('learning_rate', 'random_flip', 'val_accuracy',
                 'epochs_run', 'wall_seconds', 'pruned', 'state'):
    assert column in rows[0]
  for name in ('optimization_history', 'parallel_coordinate',
               'val_accuracy_vs_each_key'):
    assert os.path.getsize(os.path.join(workdir, report.PLOTS,
                                        f'{name}.png')) > 1000
  assert any(name.startswith('events.out.tfevents')
             for name in os.listdir(os.path.join(workdir, 'trials')))
  printed = '\n'.join(outputs)
  assert 'Best: trial' in printed and 'for the defaults' in printed
  assert re.search(r'Trial \d \(\d of 2 finished\)', printed)
  assert 'Final: test accuracy' in printed


def test_the_test_split_is_read_only_by_the_final_run(shared_study):
  workdir, folder, access_log, _ = shared_study
  with open(access_log) as file:
    lines = file.read().splitlines()
  test_folder = os.path.join(folder, 'test') + os.sep
  final = lines.index('FINAL')
  assert lines[:final] and not [line for line in lines[:final]
                                if line.startswith(test_folder)]
  assert [line for line in lines[final:] if line.startswith(test_folder)]
  [final_run] = [name for name in os.listdir(os.path.join(workdir, 'final'))
                 if not name.startswith('.')]
  with open(os.path.join(workdir, 'final', final_run, 'metrics.json')) as f:
    # The whole test split: 2 images of each of 3 classes (eval_steps=1
    # of batch 4 reads 4 of them).
    assert json.load(f)['report']['per_class_count']
  assert os.path.isdir(os.path.join(workdir, 'final', final_run, 'export',
                                    '1'))


def test_the_best_trial_reruns_as_an_ordinary_run_to_its_score(
    shared_study, tmp_path):
  workdir, _, _, outputs = shared_study
  printed = '\n'.join(outputs)
  command = re.search(r'Rerun the best trial as an ordinary run: (.*)',
                      printed).group(1)
  rerun = str(tmp_path / 'rerun')
  arguments = shlex.split(command.replace('NEW_DIR', rerun))
  assert arguments[:3] == ['python', '-m', 'keras_sft.main']
  tune_fixtures.run([sys.executable] + arguments[1:])
  study = tune_fixtures.load_study(workdir)
  best = study.best_trial
  with open(os.path.join(workdir, 'trials', str(best.number),
                         'metrics.json')) as file:
    trial_metrics = json.load(file)
  rerun_metrics = conftest.read_metrics(rerun)
  # The summary's noise statement reads the count of validation images.
  assert best.user_attrs[trial_lib.VALIDATION_IMAGES_ATTR] == (
      trial_metrics['report']['num_examples']) > 0
  # The trial's score: the mean val accuracy of its last epochs, the last
  # being the final evaluation's.
  accuracies = dict(trial_lib.history_accuracies(rerun))
  last = max(accuracies)
  accuracies[last] = rerun_metrics['eval']['accuracy']
  assert trial_lib.score(accuracies, last) == pytest.approx(
      study.best_value, abs=1e-12)
  assert rerun_metrics['eval']['loss'] == pytest.approx(
      trial_metrics['eval']['loss'], rel=1e-5)


def test_a_pruned_trial_stops_early(tmp_path, monkeypatch):
  config = cifar10_resnet50.get_config('smoke')
  folder = tune_fixtures.write_folder(str(tmp_path))
  with config.unlocked():
    config.dataset = f'folder:{folder}'
    config.global_batch_size = 4
    config.eval_steps = 1
    config.num_epochs = 3
  path = tune_fixtures.write_space(str(tmp_path))
  space = space_lib.parse(*space_lib.load(path), config)
  # Prunes every trial at its first report: the mechanism under test is the
  # trial's, not the pruner's.
  monkeypatch.setattr(study_lib, 'create_pruner',
                      lambda *_: optuna.pruners.ThresholdPruner(lower=2.0))
  workdir = str(tmp_path / 'study')
  study = study_lib.run_worker(
      config, workdir, space,
      study_lib.Options(trials=1, validation_fraction=0.25))
  [trial] = study.trials
  assert trial.state == optuna.trial.TrialState.PRUNED
  assert trial.user_attrs['epochs_run'] == 1
  assert list(trial.intermediate_values) == [1]
  run = os.path.join(workdir, 'trials', '0')
  assert len(conftest.history_rows(run)) == 1
  # Stopped before the run's end: no final evaluation; its backups are
  # gone (it never runs again), its history stays.
  assert not os.path.exists(os.path.join(run, 'metrics.json'))
  assert not os.path.exists(os.path.join(run, 'checkpoints'))
  [row] = report.rows(study, space)
  assert row['pruned'] and row['state'] == 'pruned'


def _pruning_config(num_epochs, warmup_epochs=1.0, head_only_epochs=0.0):
  config = cifar10_resnet50.get_config('smoke')
  with config.unlocked():
    config.num_epochs = num_epochs
    config.warmup_epochs = warmup_epochs
    config.head_only_epochs = head_only_epochs
  return config


@pytest.mark.parametrize('name', ['successive_halving', 'hyperband', 'median'])
def test_no_trial_is_pruned_before_the_first_pruning_epoch(name):
  """Epoch-1 accuracies (the end of the warmup) judge no trial."""
  config = _pruning_config(8)
  first = trial_lib.first_pruning_epoch(config)
  assert first == 2
  study = optuna.create_study(
      direction='maximize', pruner=study_lib.create_pruner(name, config),
      sampler=optuna.samplers.RandomSampler(seed=0))
  # Good trials that ran the whole budget (asked, as a trial does, after
  # every report: successive halving records its rungs then). Enough of
  # them that each Hyperband bracket holds some.
  for _ in range(12):
    trial = study.ask()
    for epoch in range(1, config.num_epochs + 1):
      trial.report(0.9, epoch)
      assert not trial.should_prune()
    study.tell(trial, 0.9)
  bad = study.ask()
  bad.report(0.1, 1)
  assert not bad.should_prune()
  if name == 'hyperband':
    # Its brackets (drawn by a hash of the trial) start their rungs at
    # first, 3 x first, ...: only "not before first" holds for all.
    return
  bad.report(0.1, first)
  assert bad.should_prune()


def test_first_pruning_epoch_is_one_epoch_after_warmup_and_head_only():
  first = trial_lib.first_pruning_epoch
  # One epoch at the peak after the default 1-epoch warmup, however long
  # the run (a quarter of 40 epochs made every trial run 10).
  assert [first(_pruning_config(n)) for n in (1, 2, 3, 8, 9, 40)] == [
      1, 2, 2, 2, 2, 2]
  assert first(_pruning_config(40, warmup_epochs=0.0)) == 1
  assert first(_pruning_config(40, warmup_epochs=2.5)) == 4
  assert first(_pruning_config(40, head_only_epochs=3.0)) == 4
  # The space's largest phase counts: configs/spaces/finetune.py's
  # head_only_epochs reaches 2.0.
  config = _pruning_config(20)
  finetune = space_lib.parse(*space_lib.load(
      os.path.join(conftest.REPO_ROOT, 'configs', 'spaces', 'finetune.py')),
                             config)
  assert first(config, finetune) == 3
  choices = space_lib.parse('inline', {'warmup_epochs': {
      'choices': [0.0, 5.0]}}, config)
  assert first(config, choices) == 6
  assert first(_pruning_config(4), choices) == 4
  # A key the space varies: the config's own value is no trial's.
  assert first(_pruning_config(20, warmup_epochs=6.0), space_lib.parse(
      'inline', {'warmup_epochs': {'choices': [0.0, 0.5]}}, config)) == 2
  # The pruner's first rung is that epoch.
  assert study_lib.create_pruner('successive_halving', config,
                                 finetune)._min_resource == 3


def test_no_trial_is_pruned_within_the_first_pruning_epoch_of_its_end():
  """Epoch 9 of 10 would save one epoch: the trial is not judged there."""
  # 1 and 2 epochs: the first pruning epoch is the last, so none is
  # pruned (it would have run its whole budget and lose its result).
  assert [trial_lib.last_pruning_epoch(_pruning_config(n))
          for n in (1, 2, 3, 8, 10, 40)] == [0, 0, 2, 6, 8, 38]
  assert not trial_lib.pruning_is_possible(_pruning_config(2))
  assert trial_lib.pruning_is_possible(_pruning_config(3))
  study = optuna.create_study(
      direction='maximize',
      pruner=optuna.pruners.ThresholdPruner(lower=0.5))
  trial = study.ask()
  reported = {}
  trial_lib.report(trial, 9, 0.1, reported, last_epoch=7)
  assert reported == {9: 0.1}
  with pytest.raises(optuna.TrialPruned):
    trial_lib.report(trial, 7, 0.1, reported, last_epoch=7)


def test_a_new_study_queues_the_defaults_then_its_variants(tmp_path):
  storage = optuna.storages.InMemoryStorage()
  study = optuna.create_study(storage=storage, study_name='s',
                              direction='maximize')
  defaults = {'random_flip': True, 'learning_rate': 0.01}
  variants = [({'random_flip': False, 'learning_rate': 0.01},
               'random_flip=False')]
  queued = study_lib._ensure_trials(  # pylint: disable=protected-access
      study, storage, str(tmp_path), 's', 3, defaults, variants)
  assert queued == 3
  trials = study.get_trials()
  assert [trial.system_attrs.get('fixed_params') for trial in trials] == [
      defaults, variants[0][0], {}]
  assert trials[0].user_attrs[study_lib.DEFAULTS_ATTR]
  assert trials[1].user_attrs[study_lib.VARIANT_ATTR] == 'random_flip=False'
  # A rerun with more trials adds sampled ones only.
  assert study_lib._ensure_trials(  # pylint: disable=protected-access
      study, storage, str(tmp_path), 's', 5, defaults, variants) == 2
  assert [trial.system_attrs.get('fixed_params')
          for trial in study.get_trials()][3:] == [{}, {}]


def test_half_the_trials_after_the_defaults_are_variants_by_default():
  assert [study_lib.Options(trials=n).variant_count()
          for n in (1, 2, 3, 12, 20)] == [0, 0, 1, 5, 9]
  assert study_lib.Options(trials=12, variant_trials=0).variant_count() == 0


def test_a_pruned_trials_objects_are_released_off_the_main_thread():
  """Their destructor (tf.data's iterator sleeps there) does not hold up
  the next trial."""
  released = []

  class Slow:

    def __del__(self):
      time.sleep(1.0)
      released.append(threading.current_thread())

  box = [Slow()]
  started = time.monotonic()
  trial_lib.release_in_background(box)
  assert time.monotonic() - started < 0.5
  for thread in threading.enumerate():
    if thread.name == 'keras_sft-release':
      thread.join(timeout=10)
  assert box == [] and len(released) == 1
  assert released[0] is not threading.main_thread()


def test_the_score_is_the_mean_of_the_last_epochs():
  accuracies = {1: 0.5, 2: 0.6, 3: 0.9, 4: 0.6}
  assert trial_lib.score(accuracies, 1) == 0.5
  assert trial_lib.score(accuracies, 2) == pytest.approx(0.55)
  assert trial_lib.score(accuracies, 4) == pytest.approx(0.7)
  # One epoch's spike does not decide: reported to the pruner smoothed.
  study = optuna.create_study(direction='maximize')
  trial = study.ask()
  reported = {}
  for epoch, value in accuracies.items():
    trial_lib.report(trial, epoch, value, reported, last_epoch=0)
  assert reported == accuracies
  assert trial.storage.get_trial(trial._trial_id).intermediate_values[4] == (  # pylint: disable=protected-access
      pytest.approx(0.7))
