"""Tests of the study's checks before any trial: the space, the storage, the
study already in the workdir; and of the command's `--help`."""

import os
import subprocess
import sys

import pytest

import conftest
import tune_fixtures

from configs import cifar10_resnet50
from keras_sft import errors
from keras_sft.training import train
from keras_sft.tune import space as space_lib
from keras_sft.tune import splits
from keras_sft.tune import storage as storage_lib
from keras_sft.tune import study as study_lib


def _space(tmp_path, raw, config=None):
  config = config or cifar10_resnet50.get_config('smoke')
  text = f'def get_space():\n  return {raw!r}\n'
  path = tune_fixtures.write_space(str(tmp_path), text)
  space = space_lib.parse(*space_lib.load(path), config)
  space_lib.validate(space, config, train.check_config)
  return space


def test_the_shipped_space_is_valid_for_resnet50(tmp_path):
  config = cifar10_resnet50.get_config('smoke')
  with config.unlocked():
    config.num_epochs = 5  # head_only_epochs goes up to 2.
  path = os.path.join(conftest.REPO_ROOT, 'configs', 'spaces', 'finetune.py')
  space = space_lib.parse(*space_lib.load(path), config)
  space_lib.validate(space, config, train.check_config)
  assert 'learning_rate' in space.keys and 'freeze_until' in space.keys
  # The config's own values lie inside it: trial 0 runs the defaults.
  assert space.defaults(config)['learning_rate'] == 0.01
  del tmp_path


@pytest.mark.parametrize('raw, expected', [
    ({'lerning_rate': {'low': 0.001, 'high': 0.1}},
     "Unknown config key 'lerning_rate'"),
    ({'learning_rate': {'low': 0.1, 'high': 0.01}}, 'Empty range'),
    ({'freeze_until': {'choices': []}}, 'choices'),
    ({'learning_rate': {'choices': ['fast']}}, "Wrong type"),
    ({'random_flip': {'low': 0, 'high': 1}}, 'Wrong type'),
    ({'head_only_epochs': {'low': 0, 'high': 'two'}}, 'Wrong type'),
    ({'weight_decay': {'low': 0.0, 'high': 1e-3, 'log': True}},
     'log range needs low > 0'),
    ({'freeze_until': {'choices': [None, 'stage_2']}},
     "freeze_until='stage_2'"),
    ({'model': {'choices': ['resnet50', 'convnext_tiny']},
      'batch_norm': {'choices': ['trained', 'frozen']}},
     "model='convnext_tiny'"),
    ({'dataset': {'choices': ['cifar10', 'mnist']}}, 'keeps fixed'),
    ({'learning_rate': {'low': -1.0, 'high': 0.1}}, 'learning_rate=-1.0'),
    # Keys added later are searchable and checked like the others.
    ({'gradient_accumulation_steps': {'choices': [1, 3]}},
     'gradient_accumulation_steps=3'),
    ({'weight_decay_target': {'choices': ['zero', 'pretrained']}},
     'weights=None'),
    # Inside a range whose ends are valid (smoke: batch 8; hostile pass:
    # only the ends were checked, and trial after trial was refused).
    ({'gradient_accumulation_steps': {'low': 1, 'high': 4}},
     'gradient_accumulation_steps=3'),
    ({'gradient_accumulation_steps': {'low': 1, 'high': 8, 'log': True}},
     'gradient_accumulation_steps=3'),
])
def test_a_bad_space_is_one_config_error_naming_the_value(tmp_path, raw,
                                                          expected):
  with pytest.raises(errors.ConfigError) as error:
    _space(tmp_path, raw)
  assert expected in str(error.value), str(error.value)


def test_ranges_become_optuna_parameters_of_the_key_type(tmp_path):
  space = _space(tmp_path, {
      'learning_rate': {'low': 0.001, 'high': 0.1, 'log': True},
      'log_every_steps': {'low': 1, 'high': 10},
      'freeze_until': {'choices': [None, 'conv3']}})
  kinds = {parameter.key: parameter.kind for parameter in space.parameters}
  assert kinds == {'learning_rate': 'float', 'log_every_steps': 'int',
                   'freeze_until': 'categorical'}
  space = _space(tmp_path, {'clip_global_norm': {'choices': [None, 1.0]},
                            'gradient_accumulation_steps': {'low': 1,
                                                            'high': 2}})
  assert {p.key: p.kind for p in space.parameters} == {
      'clip_global_norm': 'categorical', 'gradient_accumulation_steps': 'int'}
  config = space_lib.apply(cifar10_resnet50.get_config('smoke'),
                           {'freeze_until': 'conv3', 'learning_rate': 0.02})
  assert config.freeze_until == 'conv3' and config.learning_rate == 0.02


def test_trials_never_name_the_test_split():
  config = cifar10_resnet50.get_config('smoke')
  searched = splits.search_config(config, 0.1)
  assert searched.train_split == 'train[:90%]'
  assert searched.eval_split == 'train[90%:]'
  assert not searched.export
  with config.unlocked():
    config.dataset = 'folder:/data'
  searched = splits.search_config(config, 0.1)
  # Folders: the held-out part of train/; eval_split is then not listed.
  assert searched.validation_fraction == 0.1
  with config.unlocked():
    config.validation_fraction = 0.2
  with pytest.raises(errors.ConfigError, match='validation_fraction=0.2'):
    splits.check(config, 0.1)


def test_an_unreachable_database_is_an_error_without_its_password(tmp_path):
  with pytest.raises(errors.UnavailableError) as error:
    storage_lib.open_storage('postgresql://user:secret@127.0.0.1:1/db',
                             str(tmp_path), 120)
  assert 'secret' not in str(error.value)
  assert 'postgresql://user:***@127.0.0.1:1/db' in str(error.value)


def test_another_study_in_the_workdir_is_refused_and_kept(tmp_path):
  config = cifar10_resnet50.get_config('smoke')
  workdir = str(tmp_path / 'study')
  storage = storage_lib.open_storage(None, workdir, 120)
  options = study_lib.Options(trials=2)
  first = _space(tmp_path, {'learning_rate': {'low': 0.001, 'high': 0.1}})
  study_lib.open_study(storage, 'study',
                       study_lib.identity(config, first, options), None,
                       None, workdir)
  journal = os.path.join(workdir, storage_lib.JOURNAL_FILE)
  with open(journal, 'rb') as file:
    before = file.read()
  other = _space(tmp_path, {'learning_rate': {'low': 0.001, 'high': 0.5}})
  with pytest.raises(errors.WorkdirError) as error:
    study_lib.open_study(storage_lib.open_storage(None, workdir, 120),
                         'study', study_lib.identity(config, other, options),
                         None, None, workdir)
  assert 'another search' in str(error.value)
  assert 'space.learning_rate.high: 0.1 in the study, 0.5 now' in str(
      error.value)
  with open(journal, 'rb') as file:
    assert file.read() == before


def test_a_study_begun_before_a_config_key_existed_continues(tmp_path):
  config = cifar10_resnet50.get_config('smoke')
  workdir = str(tmp_path / 'study')
  options = study_lib.Options(trials=2)
  space = _space(tmp_path, {'learning_rate': {'low': 0.001, 'high': 0.1}})
  current = study_lib.identity(config, space, options)
  older = {**current, 'config': {
      key: value for key, value in current['config'].items()
      if key not in ('self_training_randaugment_num_ops',
                     'self_training_randaugment_magnitude')}}
  study_lib.open_study(storage_lib.open_storage(None, workdir, 120), 'study',
                       older, None, None, workdir)
  # The same search with the new keys at their older behaviour: continued.
  study_lib.open_study(storage_lib.open_storage(None, workdir, 120), 'study',
                       current, None, None, workdir)
  # A new key at another value is another search.
  with config.unlocked():
    config.self_training_randaugment_num_ops = 2
  with pytest.raises(errors.WorkdirError, match=(
      'self_training_randaugment_num_ops: 0 in the study, 2 now')):
    study_lib.open_study(storage_lib.open_storage(None, workdir, 120),
                         'study', study_lib.identity(config, space, options),
                         None, None, workdir)


def test_a_bad_space_on_the_command_line_is_one_error_line(tmp_path):
  space = tune_fixtures.write_space(
      str(tmp_path), "def get_space():\n  return {'freeze_until': "
      "{'choices': ['conv9']}}\n")
  workdir = tmp_path / 'study'
  result = subprocess.run(
      [sys.executable, '-m', 'keras_sft.tune',
       '--config=configs/cifar10_resnet50.py:smoke', f'--workdir={workdir}',
       f'--space={space}'], capture_output=True, text=True, timeout=300,
      cwd=conftest.REPO_ROOT, env=conftest.cli_env())
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  lines = [line for line in result.stderr.splitlines()
           if line.startswith('error: ')]
  assert len(lines) == 1 and "freeze_until='conv9'" in lines[0], lines
  assert not workdir.exists()


def test_help_loads_neither_tensorflow_nor_optuna():
  code = ('import sys; sys.argv = ["keras_sft.tune", "--help"]\n'
          'import runpy\n'
          'try:\n'
          '  runpy.run_module("keras_sft.tune", run_name="__main__")\n'
          'except SystemExit:\n'
          '  pass\n'
          'print("LOADED", "tensorflow" in sys.modules, "optuna" in '
          'sys.modules)')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=120, cwd=conftest.REPO_ROOT,
                          env=conftest.cli_env())
  assert 'LOADED False False' in result.stdout, result.stdout + result.stderr
  assert '--space' in result.stdout


def test_the_command_repeats_the_library_choices():
  from keras_sft.tune import __main__ as tune_main  # pylint: disable=g-import-not-at-top
  from keras_sft.tune import final  # pylint: disable=g-import-not-at-top
  assert tune_main.PRUNERS == study_lib.PRUNERS
  assert tune_main.FINAL_MODES == final.MODES


def test_variants_change_one_categorical_key_in_the_files_order():
  config = cifar10_resnet50.get_config('smoke')
  with config.unlocked():
    config.num_epochs = 5
  path = os.path.join(conftest.REPO_ROOT, 'configs', 'spaces', 'finetune.py')
  space = space_lib.parse(*space_lib.load(path), config)
  defaults = space.defaults(config)
  variants = space.variants(defaults, 100)
  assert [description for _, description in variants] == [
      "batch_norm='frozen'", 'random_crop=False', 'random_flip=False',
      "freeze_until='conv1'", "freeze_until='conv2'", "freeze_until='conv3'",
      "freeze_until='conv4'"]
  for values, description in variants:
    changed = {key for key in values if values[key] != defaults[key]}
    assert changed == {description.split('=')[0]}
    assert all(parameter.contains(values[parameter.key])
               for parameter in space.parameters)
  assert space.variants(defaults, 2) == variants[:2]
  assert space.variants(defaults, 0) == []
  # True is not 1: a choice of another type is another choice.
  mixed = space_lib.Space('inline', (space_lib.Parameter(
      'key', 'categorical', choices=(1, True, None)),))
  assert [text for _, text in mixed.variants({'key': 1}, 5)] == [
      'key=True', 'key=None']


def test_an_int_choice_of_a_float_key_is_its_float_value():
  config = cifar10_resnet50.get_config('smoke')
  space = space_lib.parse('inline', {
      'head_only_epochs': {'choices': [0, 1]},
      'random_flip': {'choices': [True, False]}}, config)
  # The config's 0.0 is the choice 0: the defaults trial and its variants
  # exist, spelled as the space spells them.
  defaults = space.defaults(config)
  assert defaults == {'head_only_epochs': 0, 'random_flip': True}
  assert [text for _, text in space.variants(defaults, 5)] == [
      'head_only_epochs=1', 'random_flip=False']
  # 0.0 and 0 are one value: refused as a repeat.
  with pytest.raises(errors.ConfigError, match='repeat a value'):
    space_lib.parse('inline', {'label_smoothing': {'choices': [0.0, 0]}},
                    config)
