r"""Command line: a hyperparameter study of fine-tuning runs.

    python -m keras_sft.tune --config=configs/cifar10_resnet50_cpu.py \
        --workdir=/tmp/study --space=configs/spaces/finetune.py --trials=12

Each trial is an ordinary run in `<workdir>/trials/<n>/`, scored on a
validation part of the training split and pruned on its per-epoch val
accuracy; the best configuration is then retrained on the whole training
split and evaluated once on the test split (`--final`). Rerunning the same
command continues the study; the same command on several machines with
`--storage=postgresql://...` shares it. A mistake in the input is one
`error: ...` line (exit 2) before any trial starts.
"""

import os
import shlex
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from keras_sft import cli

# Config files import their siblings as `configs.<name>`: resolve those from
# the directory the command runs in (see keras_sft.main).
if os.getcwd() not in sys.path:
  sys.path.insert(0, os.getcwd())

# The choices, repeated here so that `--help` imports neither Optuna nor
# TensorFlow (tests check they equal the library's).
PRUNERS = ('successive_halving', 'hyperband', 'median', 'none')
FINAL_MODES = ('retrain', 'best_trial', 'none')

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory of the study: its journal, trials/<n>/ (one '
    'run each), leaderboard.csv, plots/, summary.txt, final/.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file of the runs, e.g. '
    'configs/cifar10_resnet50_cpu.py; --config.KEY=VALUE overrides. Its '
    'num_epochs is the most epochs a trial runs.', lock_config=True)
_SPACE = flags.DEFINE_string(
    'space', None, 'Search space file: get_space() returns {config key: '
    'range}, e.g. configs/spaces/finetune.py.')
_TRIALS = flags.DEFINE_integer(
    'trials', 20, 'Trials in the study in all, over every worker; a rerun '
    'with more adds trials.')
_TIMEOUT = flags.DEFINE_float(
    'timeout', None, 'Seconds after which this worker starts no new trial '
    '(the running one finishes); the final step then uses the best so far.')
_STORAGE = flags.DEFINE_string(
    'storage', None, 'Where the study lives: default <workdir>/study.journal '
    '(Optuna\'s journal file); a journal file path (e.g. on a shared file '
    'system); or a database URL, postgresql://USER:PASSWORD@HOST:PORT/DB, '
    'shared by workers on many machines.')
_STUDY_NAME = flags.DEFINE_string(
    'study_name', None, 'Name of the study in --storage (default: the '
    'workdir\'s base name).')
_VALIDATION_FRACTION = flags.DEFINE_float(
    'validation_fraction', 0.1, 'Fraction of the training split held out to '
    'score trials (folders: of each class; tfds: the last part of the '
    'split). The test split (eval_split) is read only by the final run.')
_PRUNER = flags.DEFINE_enum(
    'pruner', 'successive_halving', PRUNERS, 'Stops bad trials early on '
    'their per-epoch val accuracy.')
_FINAL = flags.DEFINE_enum(
    'final', 'retrain', FINAL_MODES, 'After the search: retrain the best '
    'configuration on the whole training split (retrain) or reuse the best '
    'trial\'s weights (best_trial), evaluate on the test split once and '
    'export; or stop (none: for workers that others wait for).')
_VARIANT_TRIALS = flags.DEFINE_integer(
    'variant_trials', None, 'Trials after the defaults (trial 0) that each '
    'change one categorical key of the defaults to another of its choices, '
    'in the space file\'s order, so that each switch is measured against '
    'the defaults; TPE samples the other trials. Default: half of the '
    'trials after the defaults; 0: none. Decided when the study is created.')
_GRACE = flags.DEFINE_float(
    'grace_seconds', 120, 'A worker on another machine that has not been '
    'heard of for this long is presumed dead; its trial is retried.')
flags.mark_flags_as_required(['config', 'workdir', 'space'])


def _options():
  from keras_sft.tune import study  # pylint: disable=g-import-not-at-top
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  errors.check_integer('trials', _TRIALS.value, 1)
  errors.check_positive('timeout', _TIMEOUT.value, optional=True)
  errors.check_positive('grace_seconds', _GRACE.value)
  if _VARIANT_TRIALS.value is not None:
    errors.check_integer('variant_trials', _VARIANT_TRIALS.value, 0)
  return study.Options(
      trials=_TRIALS.value, timeout_seconds=_TIMEOUT.value,
      storage=_STORAGE.value, study_name=_STUDY_NAME.value,
      validation_fraction=_VALIDATION_FRACTION.value, pruner=_PRUNER.value,
      wait_for_others=_FINAL.value != 'none', grace_seconds=_GRACE.value,
      variant_trials=_VARIANT_TRIALS.value)


def _rerun_command(workdir, trial):
  from keras_sft.tune import trial as trial_lib  # pylint: disable=g-import-not-at-top
  config_json = os.path.join(
      trial_lib.trial_workdir(workdir, trial_lib.trial_number_of_run(trial)),
      'config.json')
  return ('python -m keras_sft.main '
          f'--config={shlex.quote("configs/from_run.py:" + config_json)} '
          '--workdir=NEW_DIR')


def main(argv):
  cli.check_no_arguments(argv)
  config = cli.loaded_config(_CONFIG)
  options = _options()
  # Imported here so that `--help` and flag errors wait for neither
  # TensorFlow nor Optuna.
  from keras_sft.training import train  # pylint: disable=g-import-not-at-top
  from keras_sft.tune import final  # pylint: disable=g-import-not-at-top
  from keras_sft.tune import report  # pylint: disable=g-import-not-at-top
  from keras_sft.tune import space as space_lib  # pylint: disable=g-import-not-at-top
  from keras_sft.tune import splits  # pylint: disable=g-import-not-at-top
  from keras_sft.tune import study as study_lib  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value
  # Every check before the first trial (and before the storage is touched).
  space = space_lib.parse(*space_lib.load(_SPACE.value), config)
  splits.check(config, options.validation_fraction)
  space_lib.validate(space, config, train.check_config)
  logging.info('Config:\n%s', config)
  study = study_lib.run_worker(config, workdir, space, options)
  best = final.best_trial(study)
  text = report.write(study, space, workdir,
                      _rerun_command(workdir, best) if best else None)
  print(text, flush=True)
  result = final.run(study, config, workdir, _FINAL.value)
  if result is not None:
    run_workdir, metrics = result
    export = os.path.join(run_workdir, 'export')
    exported = (f'; export in {export}' if os.path.isdir(export) else
                '; not exported (export=False)')
    print(f'Final: test accuracy {100 * metrics["eval"]["accuracy"]:.1f}% '
          f'({run_workdir}/metrics.json{exported}).', flush=True)


def run():
  """Entry point of `python -m keras_sft.tune` and `keras-sft-tune`."""
  cli.run(main)


if __name__ == '__main__':
  run()
