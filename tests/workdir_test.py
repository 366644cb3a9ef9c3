"""Tests of keras_sft.workdir: one workdir holds one run's config."""

import json
import os

import conftest
import ml_collections
import pytest

from configs import default as default_lib
from keras_sft import errors
from keras_sft import files
from keras_sft import workdir as workdir_lib


def _config_file(workdir):
  return workdir_lib.Workdir(workdir).config_file


def _read_config(workdir):
  with open(_config_file(workdir)) as file:
    return json.load(file)


def test_first_prepare_creates_workdir_and_writes_config(tmp_path):
  """The first prepare creates the directory and writes config.json."""
  workdir = str(tmp_path / 'run' / 'nested')
  config = default_lib.get_config()
  workdir_lib.Workdir(workdir).claim(config)
  assert os.path.isdir(workdir)
  written = _read_config(workdir)
  assert written == json.loads(json.dumps(config.to_dict()))
  assert written['image_size'] == config.image_size
  assert written['data_dir'] is None
  assert not os.path.exists(_config_file(workdir) + '.tmp')


def test_config_to_dict_is_json_safe():
  """Values JSON cannot hold (tuples, objects) come back JSON-safe."""
  config = ml_collections.ConfigDict({'sizes': (1, 2), 'path': object()})
  as_dict = workdir_lib.config_to_dict(config)
  assert as_dict['sizes'] == [1, 2]
  assert isinstance(as_dict['path'], str)
  assert json.loads(json.dumps(as_dict)) == as_dict


def test_same_config_again_passes_and_keeps_the_file(tmp_path):
  """Rerunning with an equal config (a fresh copy) is accepted."""
  workdir = str(tmp_path)
  workdir_lib.Workdir(workdir).claim(default_lib.get_config())
  before = _read_config(workdir)
  workdir_lib.Workdir(workdir).claim(default_lib.get_config())
  assert _read_config(workdir) == before


def test_same_config_with_tuples_passes(tmp_path):
  """Values that JSON turns into lists still compare equal on a rerun."""
  config = ml_collections.ConfigDict({'crop': (224, 224), 'name': 'x'})
  run = workdir_lib.Workdir(str(tmp_path))
  run.claim(config)
  run.claim(ml_collections.ConfigDict({'crop': (224, 224), 'name': 'x'}))
  assert _read_config(str(tmp_path))['crop'] == [224, 224]


def test_changed_value_raises_naming_key_values_and_new_workdir(tmp_path):
  """A changed value: ValueError naming the key, both values, --workdir."""
  workdir = str(tmp_path)
  config = default_lib.get_config()
  workdir_lib.Workdir(workdir).claim(config)
  changed = default_lib.get_config()
  changed.num_epochs = config.num_epochs + 5
  with pytest.raises(ValueError) as error:
    workdir_lib.Workdir(workdir).claim(changed)
  message = str(error.value)
  assert 'num_epochs' in message
  assert repr(config.num_epochs) in message
  assert repr(changed.num_epochs) in message
  assert '--workdir' in message
  assert workdir in message
  # Keys that did not change are not reported.
  assert 'image_size' not in message
  # The recorded run is untouched.
  assert _read_config(workdir)['num_epochs'] == config.num_epochs


def test_every_changed_key_is_named(tmp_path):
  """Several changes, a None → value change included, are all reported."""
  workdir = str(tmp_path)
  workdir_lib.Workdir(workdir).claim(default_lib.get_config())
  changed = default_lib.get_config()
  changed.learning_rate = 0.5
  changed.data_dir = '/data/tfds'
  with pytest.raises(ValueError) as error:
    workdir_lib.Workdir(workdir).claim(changed)
  message = str(error.value)
  assert 'learning_rate: 0.01' in message and '0.5' in message
  assert 'data_dir: None' in message and "'/data/tfds'" in message


def test_nested_keys_are_named_with_dots(tmp_path):
  """A change inside a nested ConfigDict is named by its dotted path."""
  workdir = str(tmp_path)

  def config(width):
    return ml_collections.ConfigDict({
        'model': {'head': {'width': width}, 'depth': 50},
        'seed': 0,
    })

  workdir_lib.Workdir(workdir).claim(config(8))
  workdir_lib.Workdir(workdir).claim(config(8))
  with pytest.raises(ValueError) as error:
    workdir_lib.Workdir(workdir).claim(config(16))
  message = str(error.value)
  assert 'model.head.width' in message
  assert '8' in message and '16' in message
  assert 'model.depth' not in message


def test_added_and_removed_keys_are_named(tmp_path):
  """A key only in one of the configs is named and marked absent."""
  workdir = str(tmp_path)
  run = workdir_lib.Workdir(workdir)
  run.claim(ml_collections.ConfigDict({'a': 1, 'b': 2}))
  with pytest.raises(ValueError) as error:
    run.claim(ml_collections.ConfigDict({'a': 1, 'c': 3}))
  message = str(error.value)
  assert 'b: 2 in the workdir' in message
  assert "'<absent>' now" in message
  assert 'c: ' in message and '3 now' in message


def test_new_key_set_to_none_is_named(tmp_path):
  """A key the recorded run lacks is named even when its value is None.

  This is what happens when a later version of the code adds a config key
  whose default is None (like `eval_steps`) and an old workdir is rerun.
  """
  workdir = str(tmp_path)
  workdir_lib.Workdir(workdir).claim(ml_collections.ConfigDict({'seed': 0}))
  newer = ml_collections.ConfigDict({'seed': 0})
  newer.eval_steps = ml_collections.FieldReference(None, field_type=int)
  with pytest.raises(ValueError) as error:
    workdir_lib.Workdir(workdir).claim(newer)
  assert 'eval_steps' in str(error.value)


def test_truncate_history_keeps_earlier_epochs_and_drops_a_torn_line(
    tmp_path):
  run = workdir_lib.Workdir(str(tmp_path))
  run.truncate_history(epochs=1)  # No history yet: nothing to do.
  with open(run.history_csv, 'w') as file:
    file.write('epoch,loss\n0,1.5\n1,1.2\n2,1.1\n3,')
  run.truncate_history(epochs=2)
  with open(run.history_csv) as file:
    assert file.read() == 'epoch,loss\n0,1.5\n1,1.2\n'


def test_write_json_writes_null_for_non_finite_numbers(tmp_path, caplog):
  """metrics.json stays valid JSON: no bare NaN or Infinity."""
  path = str(tmp_path / 'metrics.json')
  files.write_json(path, {'eval': {'loss': float('nan'), 'top5': 1.0},
                          'values': [float('inf'), 2.0]})
  with open(path) as file:
    text = file.read()
  assert json.loads(text, parse_constant=lambda name: pytest.fail(name)) == {
      'eval': {'loss': None, 'top5': 1.0}, 'values': [None, 2.0]}
  assert 'eval.loss' in caplog.text


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  run = workdir_lib.Workdir(str(tmp_path))
  with run.lock():
    with pytest.raises(errors.WorkdirError) as error:
      workdir_lib.Workdir(str(tmp_path)).lock()
    assert f'PID {os.getpid()}' in str(error.value)
    assert socket.gethostname() in str(error.value)
    assert str(tmp_path) in str(error.value)
  with workdir_lib.Workdir(str(tmp_path)).lock():  # Released on exit.
    pass


def test_lock_of_a_killed_process_is_released(tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  holder = subprocess.Popen(
      [sys.executable, '-c',
       'import sys, time\n'
       'from keras_sft import workdir\n'
       f'lock = workdir.Workdir({str(tmp_path)!r}).lock()\n'
       'print("locked", flush=True)\n'
       'time.sleep(60)\n'],
      stdout=subprocess.PIPE, text=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert holder.stdout.readline().strip() == 'locked'
  with pytest.raises(errors.WorkdirError, match=f'PID {holder.pid}'):
    workdir_lib.Workdir(str(tmp_path)).lock()
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with workdir_lib.Workdir(str(tmp_path)).lock():
    pass


def _identity(class_names, files=None):
  identity = {'dataset': 'folder:/data', 'num_classes': len(class_names),
              'class_names': list(class_names)}
  if files:
    identity['files'] = files
  return identity


def test_claim_refuses_another_dataset(tmp_path):
  """Renamed classes or changed files: refused, not shifted labels."""
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  config = default_lib.get_config()
  run = workdir_lib.Workdir(str(tmp_path))
  files = {'count': 2, 'sha256': 'a' * 64}
  run.claim(config, dataset=_identity(['cat', 'dog'], files))
  run.claim(config, dataset=_identity(['cat', 'dog'], files))  # The same.
  with pytest.raises(errors.WorkdirError, match="class_names.*'dog'.*'dug'"):
    run.claim(config, dataset=_identity(['cat', 'dug'], files))
  with pytest.raises(errors.WorkdirError, match='files'):
    run.claim(config, dataset=_identity(['cat', 'dog'],
                                        {'count': 3, 'sha256': 'b' * 64}))
  with open(run.dataset_file) as file:
    assert json.load(file)['class_names'] == ['cat', 'dog']


def test_fingerprint_follows_file_names_and_sizes(tmp_path):
  root = tmp_path / 'data'
  (root / 'train' / 'cat').mkdir(parents=True)
  (root / 'train' / 'cat' / 'a.png').write_bytes(b'12345')
  (root / 'train' / 'cat' / 'notes.txt').write_text('not read')

  def fingerprint():
    return workdir_lib.fingerprint_files(
        str(root), [str(path) for path in root.rglob('*.png')])

  first = fingerprint()
  assert first['count'] == 1
  assert workdir_lib.legacy_fingerprint_files(str(root))['count'] == 2
  assert fingerprint() == first
  (root / 'train' / 'cat' / 'a.png').write_bytes(b'123456')
  resized = fingerprint()
  assert resized != first
  os.rename(root / 'train' / 'cat', root / 'train' / 'kitten')
  assert fingerprint() not in (first, resized)


def test_atomic_write_does_not_follow_a_planted_symlink(tmp_path):
  outside = tmp_path / 'outside'
  outside.write_text('precious')
  run = workdir_lib.Workdir(str(tmp_path / 'run'))
  os.makedirs(run.path)
  os.symlink(outside, run.metrics_file + '.tmp')
  files.write_json(run.metrics_file, {'step': 1})
  assert outside.read_text() == 'precious'
  with open(run.metrics_file) as file:
    assert json.load(file) == {'step': 1}
  # Written with the usual permissions, not mkstemp's private 0600.
  assert os.stat(run.metrics_file).st_mode & 0o044 == 0o044 & ~_umask()


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
  run = workdir_lib.Workdir(str(tmp_path))
  os.makedirs(run.checkpoints)
  os.makedirs(os.path.join(run.export, '.tmp-abc', 'variables'))
  os.makedirs(os.path.join(run.checkpoints, '.tmp-xyz'))
  leftovers = [run.metrics_file + '.tmp', '.metrics.json.k2j.tmp',
               os.path.join(run.checkpoints, 'tmp-ckpt-3.weights.h5'),
               os.path.join(run.checkpoints, '.tmp-xyz', 'ckpt-3.weights.h5')]
  for path in leftovers:
    with open(os.path.join(run.path, path), 'w') as file:
      file.write('torn')
  kept = [run.config_file, os.path.join(run.checkpoints, 'ckpt-2.weights.h5')]
  for path in kept:
    with open(path, 'w') as file:
      file.write('{}')
  removed = run.remove_temporary_files()
  assert len(removed) == 5
  for path in kept:
    assert os.path.exists(path)
  assert sorted(os.listdir(run.path)) == ['checkpoints', 'config.json',
                                          'export']
  assert os.listdir(run.export) == []
  assert os.listdir(run.checkpoints) == ['ckpt-2.weights.h5']


@pytest.mark.parametrize('text', ['[]', 'null', '"a string"', '3'])
def test_a_config_json_that_is_not_an_object_is_a_data_error(tmp_path, text):
  run = workdir_lib.Workdir(str(tmp_path))
  with open(run.config_file, 'w') as file:
    file.write(text)
  with pytest.raises(errors.DataError, match='config.json'):
    run.claim({'learning_rate': 0.1})
  with pytest.raises(errors.DataError, match='config.json'):
    run.read_config()


def _older_run(workdir, dropped):
  """A workdir whose config.json predates the keys in `dropped`."""
  workdir_lib.Workdir(workdir).claim(default_lib.get_config())
  stored = _read_config(workdir)
  for key in dropped:
    del stored[key]
  with open(_config_file(workdir), 'w') as file:
    json.dump(stored, file)
  return stored


def test_run_started_before_a_key_existed_resumes_with_its_old_value(
    tmp_path):
  """Upgrading keras-sft mid-run: keys added since take their old value."""
  workdir = str(tmp_path)
  stored = _older_run(workdir, list(workdir_lib.KEYS_ADDED_LATER))
  config = default_lib.get_config()
  for key, value in workdir_lib.KEYS_ADDED_LATER.items():
    config[key] = value
  workdir_lib.Workdir(workdir).claim(config)
  assert _read_config(workdir) == stored  # Resumed, file untouched.


def test_added_key_with_a_new_behaviour_is_named(tmp_path):
  """A run from before precise BN, rerun with its default (20): refused."""
  workdir = str(tmp_path)
  _older_run(workdir, ['precise_bn_batches', 'random_crop'])
  config = default_lib.get_config()
  assert config.precise_bn_batches != 0 and config.random_crop
  with pytest.raises(errors.WorkdirError) as error:
    workdir_lib.Workdir(workdir).claim(config)
  message = str(error.value)
  assert 'precise_bn_batches: 0 in the workdir, 20 now' in message
  assert 'random_crop' not in message


def test_keys_added_later_exist_in_the_default_config():
  assert set(workdir_lib.KEYS_ADDED_LATER) <= set(default_lib.get_config())


def test_every_new_default_key_lets_a_run_of_0_1_0_resume(tmp_path):
  """A key added to the default config must be in KEYS_ADDED_LATER (with
  the value that reproduces older runs), or every existing workdir would
  refuse to resume with "config differs". The fixture is config.json of the
  smoke run as keras-sft 0.1.0 (before the package's folders) wrote it."""
  import json  # pylint: disable=g-import-not-at-top
  from configs import cifar10_resnet50  # pylint: disable=g-import-not-at-top
  with open(os.path.join(conftest.REPO_ROOT, 'tests', 'fixtures',
                         'config_0.1.0_smoke.json')) as file:
    old = json.load(file)
  current = workdir_lib.config_to_dict(cifar10_resnet50.get_config('smoke'))
  missing = sorted(set(current) - set(old) - set(workdir_lib.KEYS_ADDED_LATER))
  assert not missing, (
      f'{missing}: add each to workdir.KEYS_ADDED_LATER with the value '
      'that reproduces runs that predate it')
  # And the claim itself accepts the old run's config.
  run = workdir_lib.Workdir(str(tmp_path / 'run'))
  os.makedirs(run.path)
  with open(run.config_file, 'w') as file:
    json.dump(old, file)
  run.claim(cifar10_resnet50.get_config('smoke'), write=False)
