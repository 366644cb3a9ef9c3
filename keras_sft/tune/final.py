"""After the search: the best configuration, measured once on the test split.

`run(...)` takes the best complete trial and, by `mode`:

- 'retrain': trains its configuration on the whole training split (the
  config's own `train_split`, validation part included) in
  `<workdir>/final/<trial>/`, an ordinary run, which evaluates on the
  config's `eval_split` (the test split) and exports like any run;
- 'best_trial': reuses the trial's trained weights (its last backup, linked
  into `<workdir>/final/<trial>-reused/`), evaluates them on the test split
  and exports them;
- 'none': nothing.

The test split is read here only, once per best trial: a finished final
run is reported, not evaluated again. One worker runs it (a lock); the
others say so and return.
"""

import os
import shutil

from keras_sft import errors
from keras_sft import files
from keras_sft import workdir as workdir_lib
from keras_sft.tune import space as space_lib
from keras_sft.tune import splits
from keras_sft.tune import trial as trial_lib

MODES = ('retrain', 'best_trial', 'none')
FINAL = 'final'


def best_trial(study):
  """The COMPLETE trial with the highest score, or None."""
  import optuna  # pylint: disable=g-import-not-at-top
  complete = study.get_trials(deepcopy=False,
                              states=(optuna.trial.TrialState.COMPLETE,))
  return max(complete, key=lambda trial: trial.value, default=None)


def final_workdir(workdir, trial, mode):
  suffix = '' if mode == 'retrain' else '-reused'
  return os.path.join(workdir, FINAL, f'{trial.number}{suffix}')


def _link_backups(source, target):
  """Hard links (copies across file systems) of a run's backups: they are
  never rewritten in place (atomic renames), so links are safe."""
  if os.path.exists(target):
    return
  temporary = f'{target}.{files.TEMPORARY_PREFIX}{os.getpid()}'
  shutil.rmtree(temporary, ignore_errors=True)

  def link(path, destination):
    try:
      os.link(path, destination)
    except OSError:
      shutil.copy2(path, destination)

  shutil.copytree(source, temporary, copy_function=link)
  os.replace(temporary, target)


def run(study, config, workdir, mode):
  """Runs the final step; returns `(run workdir, metrics)` or None.

  Args:
    study: The finished study.
    config: The study's base config (its eval_split is the test split).
    workdir: The study's directory.
    mode: One of `MODES`.
  """
  errors.check_choice('final', mode, MODES)
  trial = best_trial(study)
  if mode == 'none' or trial is None:
    return None
  from keras_sft.training import train  # pylint: disable=g-import-not-at-top
  run_workdir = final_workdir(workdir, trial, mode)
  run = workdir_lib.Workdir(run_workdir)
  if os.path.exists(run.metrics_file):
    return run_workdir, files.read_json(run.metrics_file)
  final_config = space_lib.apply(config, trial.params)
  os.makedirs(os.path.join(workdir, FINAL), exist_ok=True)
  try:
    lock = workdir_lib.Lock(os.path.join(workdir, FINAL, '.lock'))
  except errors.WorkdirError:
    print('The final run is made by another worker of this study.',
          flush=True)
    return None
  with lock:
    if os.path.exists(run.metrics_file):
      return run_workdir, files.read_json(run.metrics_file)
    print(f'Final run of trial {trial.number}'
          f'{" (retrained on the whole training split)" if mode == "retrain" else " (its weights reused)"}'
          f', evaluated once on {splits.test_split(config)}: {run_workdir}',
          flush=True)
    if mode == 'retrain':
      metrics = train.train_and_evaluate(final_config, run_workdir)
    else:
      source = trial_lib.trial_workdir(
          workdir, trial_lib.trial_number_of_run(trial))
      os.makedirs(run_workdir, exist_ok=True)
      _link_backups(workdir_lib.Workdir(source).checkpoints, run.checkpoints)
      run.claim(final_config)
      metrics = train.evaluate(final_config, run_workdir)
      if final_config.export:
        from keras_sft.export import formats  # pylint: disable=g-import-not-at-top
        formats.export_run(run_workdir, checkpoint='last')
  return run_workdir, metrics
