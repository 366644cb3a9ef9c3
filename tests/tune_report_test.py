"""Tests of the study's summary (keras_sft/tune/report.py)."""

import optuna
import pytest

from configs import cifar10_resnet50
from keras_sft.tune import report
from keras_sft.tune import space as space_lib
from keras_sft.tune import study as study_lib


def _study(values):
  study = optuna.create_study(direction='maximize',
                              sampler=optuna.samplers.RandomSampler(seed=0))
  for value in values:
    trial = study.ask()
    trial.suggest_float('learning_rate', 1e-3, 1.0, log=True)
    trial.suggest_categorical('clip_global_norm', [None, 1.0])
    trial.suggest_int('gradient_accumulation_steps', 1, 2)
    study.tell(trial, value)
  return study


def test_equal_scores_rank_no_key():
  """Hostile pass: 4 trials all at 0.25 printed "Keys that mattered most:
  gradient_accumulation_steps 0.20, clip_global_norm 0.20, ..."."""
  ranked = report.importances(_study([0.25] * 4))
  assert isinstance(ranked, str)
  assert 'all 4 complete trials scored 0.2500' in ranked


def test_different_scores_are_ranked():
  ranked = report.importances(_study([0.1, 0.5, 0.3, 0.9, 0.2]))
  assert isinstance(ranked, dict)
  assert set(ranked) == {'learning_rate', 'clip_global_norm',
                         'gradient_accumulation_steps'}


def test_the_table_names_the_defaults_and_each_variants_change(tmp_path):
  config = cifar10_resnet50.get_config('smoke')
  space = space_lib.parse('inline', {'random_flip': {'choices': [True, False]}},
                          config)
  storage = optuna.storages.InMemoryStorage()
  study = optuna.create_study(storage=storage, study_name='s',
                              direction='maximize')
  defaults = space.defaults(config)
  study_lib._ensure_trials(  # pylint: disable=protected-access
      study, storage, str(tmp_path), 's', 2, defaults,
      space.variants(defaults, 1))
  for value in (0.5, 0.75):
    trial = study.ask()
    space.suggest(trial)
    study.tell(trial, value)
  rows = report.rows(study, space)
  assert [row['changed_from_defaults'] for row in rows] == [
      'random_flip=False', '']
  lines = report.table(rows, space.keys).splitlines()
  assert lines[1].startswith('1 (random_flip=False)')
  assert lines[2].startswith('0 (defaults)')


def _defaults_and_best(defaults_value, best_value, validation_images,
                       defaults_images=None):
  study = optuna.create_study(direction='maximize')
  for value, images, attributes in (
      (defaults_value, (validation_images if defaults_images is None
                        else defaults_images), {study_lib.DEFAULTS_ATTR: True}),
      (best_value, validation_images, {})):
    trial = study.ask()
    trial.suggest_float('learning_rate', 1e-3, 1.0, log=True)
    for key, attribute in attributes.items():
      trial.set_user_attr(key, attribute)
    if images != 'absent':
      trial.set_user_attr(report.trial_lib.VALIDATION_IMAGES_ATTR, images)
    study.tell(trial, value)
  return study.trials


def test_a_difference_inside_the_validation_noise_is_called_so():
  """50 images: 0.84 vs 0.82 is 2 points, 2 standard errors are 15."""
  defaults, best = _defaults_and_best(0.82, 0.84, 50)
  text = report.noise_text(best, defaults)
  assert 'within the noise of 50 validation images' in text
  assert '15.2 points' in text
  assert '--validation_fraction' in text


def test_a_difference_beyond_the_validation_noise_is_called_so():
  """1,000 images: 0.80 vs 0.84 is 4 points, 2 standard errors 3.4."""
  defaults, best = _defaults_and_best(0.80, 0.84, 1000)
  text = report.noise_text(best, defaults, compared=12)
  assert 'more than the noise of 1000 validation images' in text
  assert '3.4 points' in text
  assert 'best of 12 trials' in text


def test_a_perfect_score_is_not_free_of_noise():
  """Hostile pass: the plain formula has no variance at 100%, so 50/50
  against 46/50 (Fisher p 0.12) was called beyond the noise."""
  defaults, best = _defaults_and_best(46 / 50, 1.0, 50)
  assert 'within the noise' in report.noise_text(best, defaults)


def test_too_few_validation_images_are_said_to_be_too_few():
  defaults, best = _defaults_and_best(0.0, 1.0, 2)
  text = report.noise_text(best, defaults)
  assert text.startswith('2 validation images are too few')
  defaults, best = _defaults_and_best(0.0, 1.0, 1)
  assert report.noise_text(best, defaults).startswith(
      '1 validation image is too few')


def test_each_trial_counts_its_own_validation_images():
  """Hostile pass: the best trial's 10,000 images stood for the defaults'
  50 too (a 1.1-point margin where the defaults' noise alone is ~11)."""
  defaults, best = _defaults_and_best(0.80, 0.84, 10000, defaults_images=50)
  text = report.noise_text(best, defaults)
  assert 'within the noise of 50 validation images' in text
  # A defaults trial without the count (an older study) scored on the same
  # images as the best one.
  defaults, best = _defaults_and_best(0.80, 0.84, 1000,
                                      defaults_images='absent')
  assert 'more than the noise of 1000' in report.noise_text(best, defaults)


@pytest.mark.parametrize('images', [0, -5, True, 50.0, '50', None, 'absent'])
def test_no_noise_statement_without_a_usable_count(images):
  defaults, best = _defaults_and_best(0.80, 0.84, images)
  assert report.noise_text(best, defaults) == ''


def test_no_noise_statement_for_the_defaults_alone():
  defaults, _ = _defaults_and_best(0.80, 0.84, 50)
  assert report.noise_text(defaults, defaults) == ''


def test_the_summary_carries_the_noise_statement():
  study = optuna.create_study(direction='maximize')
  for value, is_defaults in ((0.82, True), (0.84, False)):
    trial = study.ask()
    trial.suggest_float('learning_rate', 1e-3, 1.0, log=True)
    if is_defaults:
      trial.set_user_attr(study_lib.DEFAULTS_ATTR, True)
    trial.set_user_attr(report.trial_lib.VALIDATION_IMAGES_ATTR, 50)
    study.tell(trial, value)
  space = space_lib.parse(
      'inline', {'learning_rate': {'low': 1e-3, 'high': 1.0, 'log': True}},
      cifar10_resnet50.get_config('smoke'))
  text = report.summary(study, space)
  assert 'vs 82.0% for the defaults' in text
  assert 'within the noise of 50 validation images' in text


def test_only_keys_that_differ_between_complete_trials_are_ranked():
  """A study whose two complete trials differed in random_flip alone
  ranked three keys they shared first (fANOVA on two points)."""
  studied = optuna.create_study(direction='maximize')
  for flip, value in ((True, 0.87), (False, 0.89)):
    studied.enqueue_trial({'learning_rate': 0.01, 'label_smoothing': 0.1,
                           'random_flip': flip})
    trial = studied.ask()
    trial.suggest_float('learning_rate', 1e-3, 1.0, log=True)
    trial.suggest_float('label_smoothing', 0.0, 0.2)
    trial.suggest_categorical('random_flip', [True, False])
    studied.tell(trial, value)
  assert report.importances(studied) == {'random_flip': 1.0}
  shared = optuna.create_study(direction='maximize')
  for value in (0.87, 0.89):
    shared.enqueue_trial({'learning_rate': 0.01})
    trial = shared.ask()
    trial.suggest_float('learning_rate', 1e-3, 1.0, log=True)
    shared.tell(trial, value)
  assert 'share every value' in report.importances(shared)
