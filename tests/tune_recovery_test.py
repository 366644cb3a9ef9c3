"""kill -9 of a worker mid-trial, then the same command again: the trial is
requeued with its values, resumes its workdir from the last backup, and the
study ends with every trial accounted for, none run twice."""

import os
import signal
import time

import optuna

import conftest
import tune_fixtures


def test_kill_9_mid_trial_then_rerun_resumes_the_trial(tmp_path):
  directory = str(tmp_path)
  folder = tune_fixtures.write_folder(directory)
  space = tune_fixtures.write_space(directory)
  workdir = os.path.join(directory, 'study')
  command = tune_fixtures.tune_command(workdir, folder, space, '--trials=1',
                                       '--final=none')
  backup = os.path.join(workdir, 'trials', '0', 'checkpoints',
                        'checkpoint.json')
  with open(os.path.join(directory, 'worker.log'), 'w') as log:
    worker = tune_fixtures.start(command, log=log)
    deadline = time.monotonic() + 600
    # The smoke run backs up every step: kill after the first of 4.
    while not os.path.exists(backup) and worker.poll() is None:
      assert time.monotonic() < deadline
      time.sleep(0.2)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
  step_when_killed = conftest.latest_backup(
      os.path.join(workdir, 'trials', '0'))[1]
  assert step_when_killed < 4
  study = tune_fixtures.load_study(workdir)
  assert [trial.state for trial in study.trials] == [
      optuna.trial.TrialState.RUNNING]

  result = tune_fixtures.run(command)

  study = tune_fixtures.load_study(workdir)
  killed, retry = study.trials
  assert killed.state == optuna.trial.TrialState.FAIL
  assert retry.state == optuna.trial.TrialState.COMPLETE
  assert retry.system_attrs['failed_trial'] == 0
  assert retry.params == killed.params
  assert 'retry of trial 0, resuming its workdir' in result.stdout
  # One workdir, resumed (not restarted): each epoch once in its history.
  assert sorted(name for name in os.listdir(os.path.join(workdir, 'trials'))
                if name.isdigit()) == ['0']
  run = os.path.join(workdir, 'trials', '0')
  assert [row['epoch'] for row in conftest.history_rows(run)] == ['0', '1']
  assert conftest.read_metrics(run)['step'] == 4
  with open(os.path.join(run, 'train.log')) as file:
    log = file.read()
  assert log.count('INFO Strategy ') == 2  # Two starts of one run.
  assert 'already finished' not in log
  # A third run of the command finds nothing to do.
  again = tune_fixtures.run(command)
  assert 'starts' not in again.stdout
  assert len(tune_fixtures.load_study(workdir).trials) == 2
