"""Tests of keras_sft.training.checkpoints on a tiny compiled Classifier."""

import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_sft import files
from keras_sft.models import classifier
from keras_sft.training import callbacks
from keras_sft.training import checkpoints

_SHAPE = (6, 6, 3)
_NUM_CLASSES = 3


def _model(seed=0, batch_norm=True, optimizer=None):
  """A tiny Conv/BN/Dense Classifier, compiled with SGD + momentum, built."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input(_SHAPE)
  x = keras.layers.Conv2D(4, 3)(inputs)
  if batch_norm:
    x = keras.layers.BatchNormalization()(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  outputs = keras.layers.Dense(_NUM_CLASSES)(x)
  model = classifier.Classifier(keras.Model(inputs, outputs),
                                weight_decay=1e-3)
  model.compile(
      optimizer=optimizer or keras.optimizers.SGD(learning_rate=0.1,
                                                  momentum=0.9),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model(np.zeros((1,) + _SHAPE, np.float32))
  return model


def _data(num_examples=8, seed=0, nan=False):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(num_examples,) + _SHAPE).astype(np.float32)
  if nan:
    images[:] = np.nan
  labels = rng.integers(0, _NUM_CLASSES, num_examples).astype(np.int64)
  return images, labels


def _train(model, steps, batch=4, nan=False):
  images, labels = _data(nan=nan)
  dataset = tf.data.Dataset.from_tensor_slices(
      (images, labels)).repeat().batch(batch)
  model.fit(dataset, steps_per_epoch=steps, epochs=1, shuffle=False,
            verbose=0)


def _optimizer_state(model):
  """Returns the optimizer's `(name, value)` pairs, in its variable order."""
  return [(variable.name, variable.numpy().copy())
          for variable in model.optimizer.variables]


def _weights(model):
  return [weight.copy() for weight in model.get_weights()]


def _backups(directory):
  return sorted(name for name in os.listdir(directory)
                if name.endswith('.weights.h5'))


def test_latest_is_none_and_restore_is_zero_without_backups(tmp_path):
  """No backup yet: latest() is None and restore() returns step 0."""
  checkpointer = checkpoints.Checkpointer(str(tmp_path / 'ckpt'))
  assert checkpointer.latest() is None
  model = _model()
  before = _weights(model)
  assert checkpointer.restore(model) == 0
  for want, got in zip(before, model.get_weights()):
    np.testing.assert_array_equal(got, want)


def test_keep_must_be_positive(tmp_path):
  """keep=0 would delete every backup: a ValueError naming it."""
  with pytest.raises(ValueError, match='keep=0'):
    checkpoints.Checkpointer(str(tmp_path), keep=0)


def test_save_then_restore_gives_same_weights_and_optimizer_state(tmp_path):
  """A fresh model restored from a backup equals the saved one exactly.

  That covers the weights (BatchNorm statistics included) and the optimizer
  state: its iteration count and momentum slots.
  """
  directory = str(tmp_path / 'ckpt')
  steps = 3
  model = _model(seed=0)
  _train(model, steps)
  assert int(model.optimizer.iterations.numpy()) == steps
  assert checkpoints.trained_steps(model) == steps
  saved_weights = _weights(model)
  saved_state = _optimizer_state(model)
  momenta = [value for name, value in saved_state if 'momentum' in name]
  assert momenta and any(np.any(value != 0) for value in momenta)

  path = checkpoints.Checkpointer(directory).save(model, steps)
  assert os.path.basename(path) == f'ckpt-{steps}.weights.h5'
  assert checkpoints.Checkpointer(directory).latest() == (path, steps)

  fresh = _model(seed=1)
  assert not all(
      np.array_equal(a, b) for a, b in zip(saved_weights, fresh.get_weights()))
  assert checkpoints.Checkpointer(directory).restore(fresh) == steps
  for want, got in zip(saved_weights, fresh.get_weights()):
    np.testing.assert_array_equal(got, want)
  restored_state = _optimizer_state(fresh)
  # Slot names carry per-model layer names; order and values must agree.
  assert len(restored_state) == len(saved_state)
  for (name, want), (_, got) in zip(saved_state, restored_state):
    np.testing.assert_array_equal(got, want, err_msg=name)
  assert int(fresh.optimizer.iterations.numpy()) == steps
  assert checkpoints.trained_steps(fresh) == steps


def test_restored_model_trains_like_the_original(tmp_path):
  """One more step after a restore equals one more step without a restart."""
  directory = str(tmp_path / 'ckpt')
  model = _model(seed=0)
  _train(model, 2)
  checkpoints.Checkpointer(directory).save(model, 2)
  fresh = _model(seed=1)
  checkpoints.Checkpointer(directory).restore(fresh)
  _train(model, 1)
  _train(fresh, 1)
  for want, got in zip(model.get_weights(), fresh.get_weights()):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_keep_prunes_older_backups(tmp_path):
  """With keep=2 only the two newest backups remain; the pointer names the
  newest."""
  directory = str(tmp_path / 'ckpt')
  checkpointer = checkpoints.Checkpointer(directory, keep=2)
  model = _model()
  steps = [1, 2, 3, 10]
  for step in steps:
    checkpointer.save(model, step)
  assert _backups(directory) == sorted(
      f'ckpt-{step}.weights.h5' for step in steps[-2:])
  path, step = checkpointer.latest()
  assert step == steps[-1]
  assert os.path.basename(path) == f'ckpt-{steps[-1]}.weights.h5'
  with open(os.path.join(directory, 'checkpoint.json')) as file:
    state = json.load(file)
  assert (state['file'], state['step']) == (f'ckpt-{steps[-1]}.weights.h5',
                                            steps[-1])
  assert [backup['step'] for backup in state['backups']] == steps[:-3:-1]


def test_leftover_temporary_file_is_removed_on_next_save(tmp_path):
  """A tmp-* file left by a killed writer is deleted by the next save."""
  directory = tmp_path / 'ckpt'
  directory.mkdir()
  leftover = directory / 'tmp-ckpt-7.weights.h5'
  leftover.write_bytes(b'torn')
  checkpoints.Checkpointer(str(directory)).save(_model(), 8)
  assert not leftover.exists()
  assert sorted(os.listdir(directory)) == ['checkpoint.json',
                                           'ckpt-8.weights.h5']


def test_pointer_to_missing_file_raises(tmp_path):
  """A pointer naming only a deleted backup: errors naming file and dir."""
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / 'ckpt')
  checkpointer = checkpoints.Checkpointer(directory)
  path = checkpointer.save(_model(), 5)
  os.remove(path)
  with pytest.raises(FileNotFoundError) as error:
    checkpointer.latest()
  assert directory in str(error.value)
  assert os.path.basename(path) in str(error.value)
  with pytest.raises(errors.WorkdirError) as error:
    checkpointer.restore(_model())
  assert os.path.basename(path) in str(error.value)
  assert 'missing' in str(error.value)


def test_restore_refuses_backup_whose_step_disagrees_with_pointer(tmp_path):
  """A backup holding another step than its pointer: ValueError."""
  directory = str(tmp_path / 'ckpt')
  model = _model()
  _train(model, 2)
  iterations = checkpoints.trained_steps(model)
  claimed = iterations + 3
  checkpoints.Checkpointer(directory).save(model, claimed)
  with pytest.raises(ValueError) as error:
    checkpoints.Checkpointer(directory).restore(_model(seed=1))
  assert str(iterations) in str(error.value)
  assert str(claimed) in str(error.value)


def _expected_backup_steps(steps_per_epoch, epochs, every_steps):
  """The backup rule, stepped by hand: every N steps and at epoch ends."""
  saved, last = [], 0
  for step in range(1, steps_per_epoch * epochs + 1):
    if step - last >= every_steps:
      saved.append(step)
      last = step
    if step % steps_per_epoch == 0 and step != last:
      saved.append(step)
      last = step
  return saved


def test_backup_callback_saves_every_n_steps_and_at_epoch_end(tmp_path,
                                                              monkeypatch):
  """During fit, backups are written every N steps and at each epoch end."""
  directory = str(tmp_path / 'ckpt')
  checkpointer = checkpoints.Checkpointer(directory, keep=100)
  saved = []
  real_save = checkpointer.save

  def recording_save(model, step):
    saved.append(step)
    return real_save(model, step)

  monkeypatch.setattr(checkpointer, 'save', recording_save)
  steps_per_epoch, epochs, every = 5, 2, 2
  model = _model()
  images, labels = _data()
  dataset = tf.data.Dataset.from_tensor_slices(
      (images, labels)).repeat().batch(4)
  model.fit(dataset, steps_per_epoch=steps_per_epoch, epochs=epochs,
            callbacks=[callbacks.BackupCallback(checkpointer, every)],
            shuffle=False, verbose=0)
  expected = _expected_backup_steps(steps_per_epoch, epochs, every)
  assert saved == expected
  assert _backups(directory) == sorted(
      f'ckpt-{step}.weights.h5' for step in expected)
  assert checkpointer.latest()[1] == steps_per_epoch * epochs
  # The last backup is the final state of the run.
  fresh = _model(seed=1)
  assert checkpointer.restore(fresh) == steps_per_epoch * epochs
  for want, got in zip(model.get_weights(), fresh.get_weights()):
    np.testing.assert_array_equal(got, want)


def test_backup_callback_resumed_fit_counts_from_restored_step(tmp_path):
  """After a restore the N-step rhythm counts from the restored step."""
  directory = str(tmp_path / 'ckpt')
  checkpointer = checkpoints.Checkpointer(directory, keep=100)
  model = _model()
  _train(model, 3)
  checkpointer.save(model, 3)
  fresh = _model(seed=1)
  checkpointer.restore(fresh)
  images, labels = _data()
  dataset = tf.data.Dataset.from_tensor_slices(
      (images, labels)).repeat().batch(4)
  # 3 more steps: 3 → 6, every 2 steps gives 5, then the epoch end at 6.
  fresh.fit(dataset, steps_per_epoch=3, epochs=1,
            callbacks=[callbacks.BackupCallback(checkpointer, 2)],
            shuffle=False, verbose=0)
  assert _backups(directory) == sorted(
      f'ckpt-{step}.weights.h5' for step in (3, 3 + 2, 3 + 3))


def test_backup_callback_never_saves_a_nan_loss(tmp_path):
  """When the loss is NaN, neither the N-step nor the epoch-end backup runs."""
  directory = str(tmp_path / 'ckpt')
  checkpointer = checkpoints.Checkpointer(directory)
  model = _model()
  images, labels = _data(nan=True)
  dataset = tf.data.Dataset.from_tensor_slices(
      (images, labels)).repeat().batch(4)
  history = model.fit(
      dataset, steps_per_epoch=3, epochs=2,
      callbacks=[callbacks.BackupCallback(checkpointer, 1)],
      shuffle=False, verbose=0)
  assert all(math.isnan(loss) for loss in history.history['loss'])
  assert int(model.optimizer.iterations.numpy()) == 6
  assert checkpointer.latest() is None
  assert not os.path.exists(directory) or not _backups(directory)


def test_backup_callback_skips_nan_logs_then_saves_finite_ones(tmp_path):
  """Called directly: NaN/inf logs save nothing, the next finite ones do."""
  directory = str(tmp_path / 'ckpt')
  checkpointer = checkpoints.Checkpointer(directory)
  model = _model()
  callback = callbacks.BackupCallback(checkpointer, every_steps=2)
  callback.set_model(model)
  callback.on_train_begin()
  model.step_counter.assign(2)
  callback.on_train_batch_end(1, {'loss': float('nan')})
  callback.on_train_batch_end(1, {'loss': np.float32('inf')})
  callback.on_epoch_end(0, {'loss': float('nan')})
  assert checkpointer.latest() is None
  callback.on_train_batch_end(1, {'loss': 0.5})
  assert checkpointer.latest()[1] == 2
  # The same step is not written twice, even at the epoch end.
  callback.on_epoch_end(0, {'loss': 0.5})
  assert _backups(directory) == ['ckpt-2.weights.h5']


def _loss_scaled_model(seed=0):
  """No BatchNorm: an inf batch would make its moving statistics NaN."""
  return _model(seed, batch_norm=False,
                optimizer=keras.optimizers.LossScaleOptimizer(
                    keras.optimizers.SGD(learning_rate=0.1)))


def test_trained_steps_counts_the_batches_of_skipped_steps(tmp_path):
  """A loss-scaled step skipped on an overflow still consumed its batch.

  The optimizer's step stays behind; the run's position (and its backup's
  step) must not, or a resumed run would train on that batch again.
  """
  images, labels = _data(num_examples=12)
  images[4:8] = np.inf  # The second of three batches overflows.
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
  model = _loss_scaled_model()
  model.fit(dataset, epochs=1, shuffle=False, verbose=0)
  assert int(model.optimizer.iterations.numpy()) == 2  # One step skipped.
  assert checkpoints.trained_steps(model) == 3
  directory = str(tmp_path / 'ckpt')
  checkpoints.Checkpointer(directory).save(model, 3)
  fresh = _loss_scaled_model(seed=1)
  assert checkpoints.Checkpointer(directory).restore(fresh) == 3
  # The resumed input stream starts after the three batches taken.
  assert checkpoints.trained_steps(fresh) == 3


def test_step_counter_advances_once_per_global_step_across_replicas():
  """Two replicas: the counter moves by 1 per step, not by 2."""
  # Reduction by copying, not collectives: collective keys of several
  # MirroredStrategy objects in one process collide.
  strategy = tf.distribute.MirroredStrategy(
      ['/cpu:0', '/cpu:1'],
      cross_device_ops=tf.distribute.ReductionToOneDevice())
  with strategy.scope():
    model = _model()
  _train(model, 3)
  assert checkpoints.trained_steps(model) == 3
  assert int(model.optimizer.iterations.numpy()) == 3


def test_backup_without_step_counter_is_refused_clearly(tmp_path):
  """A backup of an older layout (no step counter) names file and way out."""
  import h5py  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / 'ckpt')
  model = _model()
  model.optimizer.build(model.trainable_variables)
  path = checkpoints.Checkpointer(directory).save(model, 0)
  with h5py.File(path, 'a') as file:
    del file['vars/0']  # What a backup of the previous version lacks.
  with open(os.path.join(directory, 'checkpoint.json'), 'w') as file:
    json.dump({'file': os.path.basename(path), 'step': 0}, file)  # Its pointer.
  with pytest.raises(ValueError) as error:
    checkpoints.Checkpointer(directory).restore(_model(seed=1))
  message = str(error.value)
  assert os.path.basename(path) in message
  assert 'step counter' in message and 'new --workdir' in message


def test_backup_is_durable_in_its_directory_before_the_pointer_names_it(
    tmp_path, monkeypatch):
  """fsync(dir) between the backup's rename and the pointer's rename.

  Without it a power loss can keep the pointer's rename and lose the
  backup's: a pointer to a missing file.
  """
  directory = str(tmp_path / 'ckpt')
  os.makedirs(directory)
  events = []
  real_replace, real_fsync = os.replace, os.fsync

  def replace(source, target, **kwargs):
    events.append(('replace', os.path.basename(target)))
    return real_replace(source, target, **kwargs)

  def fsync(descriptor):
    events.append(('fsync', os.readlink(f'/proc/self/fd/{descriptor}')))
    return real_fsync(descriptor)

  monkeypatch.setattr(os, 'replace', replace)
  monkeypatch.setattr(os, 'fsync', fsync)
  checkpoints.Checkpointer(directory).save(_model(), 1)
  backup = events.index(('replace', 'ckpt-1.weights.h5'))
  pointer = events.index(('replace', 'checkpoint.json'))
  assert ('fsync', directory) in events[backup:pointer]
  assert ('fsync', directory) in events[pointer:]


class _Crash(Exception):
  """Stands for the process dying at that moment."""


def test_crash_after_best_weights_keeps_them_from_a_worse_epoch(tmp_path,
                                                                monkeypatch):
  """Killed between best.weights.h5 and its record: the rerun still knows
  the value of the weights in best.weights.h5, so a worse epoch keeps off."""
  directory = str(tmp_path / 'ckpt')
  model = _model()
  _train(model, 1)
  callback = callbacks.BestWeightsCallback(directory)
  callback.set_model(model)
  callback.on_train_begin()
  callback.on_epoch_end(0, {'val_accuracy': 0.4})
  _train(model, 1)
  better = _weights(model)

  def crash(*args, **kwargs):
    raise _Crash()

  monkeypatch.setattr(files, 'atomic_write', crash)
  with pytest.raises(_Crash):
    callback.on_epoch_end(1, {'val_accuracy': 0.6})
  monkeypatch.undo()

  _train(model, 1)  # The rerun's next epoch is worse.
  rerun = callbacks.BestWeightsCallback(directory)
  rerun.set_model(model)
  rerun.on_train_begin()
  rerun.on_epoch_end(2, {'val_accuracy': 0.5})
  fresh = _model(seed=1)
  fresh.optimizer.build(fresh.trainable_variables)
  fresh.load_weights(os.path.join(directory, checkpoints.BEST_WEIGHTS))
  for want, got in zip(better, fresh.get_weights()):
    np.testing.assert_array_equal(got, want)
  with open(os.path.join(directory, 'best.json')) as file:
    assert json.load(file)['value'] == pytest.approx(0.6)


def _poison(model):
  """Makes one kernel non-finite, as a diverged step does."""
  kernel = model.network.layers[-1].kernel
  kernel.assign(np.full(kernel.shape, np.nan, np.float32))


def test_non_finite_weights_are_never_backed_up_even_with_finite_logs(
    tmp_path):
  """The variables are checked, not just the loss in the logs."""
  directory = str(tmp_path / 'ckpt')
  checkpointer = checkpoints.Checkpointer(directory)
  model = _model()
  _poison(model)
  backup = callbacks.BackupCallback(checkpointer, every_steps=1)
  best = callbacks.BestWeightsCallback(directory)
  for callback in (backup, best):
    callback.set_model(model)
    callback.on_train_begin()
  model.step_counter.assign(1)
  backup.on_train_batch_end(0, {'loss': 0.5})
  backup.on_epoch_end(0, {'loss': 0.5})
  best.on_epoch_end(0, {'loss': 0.5, 'val_accuracy': 0.9})
  assert checkpointer.latest() is None
  assert not os.path.exists(os.path.join(directory,
                                         checkpoints.BEST_WEIGHTS))
  with pytest.raises(FloatingPointError, match='not finite'):
    checkpointer.save(model, 1)


def _two_backups(directory):
  """Backups at steps 1 and 2 of one model; returns (paths, weights)."""
  checkpointer = checkpoints.Checkpointer(directory, keep=2)
  model = _model()
  _train(model, 1)
  first = checkpointer.save(model, 1)
  first_weights = _weights(model)
  _train(model, 1)
  second = checkpointer.save(model, 2)
  return (first, second), (first_weights, _weights(model))


def _zero_half_of_a_kernel(path):
  import h5py  # pylint: disable=g-import-not-at-top
  with h5py.File(path, 'a') as file:
    names = []
    file.visititems(lambda name, item: names.append(name)
                    if isinstance(item, h5py.Dataset) and item.ndim == 4
                    else None)
    kernel = file[names[0]]
    values = kernel[()]
    values.reshape(-1)[:values.size // 2] = 0
    kernel[...] = values


def _truncate(path):
  with open(path, 'r+b') as file:
    file.truncate(os.path.getsize(path) // 2)


def _overwrite_with_garbage(path):
  with open(path, 'wb') as file:
    file.write(b'\x00garbage' * 100)


@pytest.mark.parametrize('damage', [_truncate, _overwrite_with_garbage,
                                    _zero_half_of_a_kernel, os.remove])
def test_damaged_newest_backup_is_named_and_the_previous_one_used(
    tmp_path, caplog, damage):
  directory = str(tmp_path / 'ckpt')
  (_, newest), (first_weights, _) = _two_backups(directory)
  damage(newest)
  fresh = _model(seed=1)
  fresh.optimizer.build(fresh.trainable_variables)
  assert checkpoints.Checkpointer(directory).restore(fresh) == 1
  assert os.path.basename(newest) in caplog.text
  for want, got in zip(first_weights, fresh.get_weights()):
    np.testing.assert_array_equal(got, want)


def test_non_finite_backup_is_not_resumed(tmp_path, caplog):
  """A backup whose values are NaN (written elsewhere) is skipped too."""
  import h5py  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / 'ckpt')
  (_, newest), _ = _two_backups(directory)
  with h5py.File(newest, 'a') as file:
    file['layers/functional/layers/dense/vars/0'][...] = np.nan
  pointer = os.path.join(directory, 'checkpoint.json')
  with open(pointer) as file:
    state = json.load(file)
  for backup in state['backups']:  # Make the checksums agree again.
    backup.pop('sha256')
  state.pop('sha256')
  with open(pointer, 'w') as file:
    json.dump(state, file)
  assert checkpoints.Checkpointer(directory).restore(_model(seed=1)) == 1
  assert 'not finite' in caplog.text


def test_truncated_pointer_falls_back_to_the_backups_on_disk(tmp_path,
                                                             caplog):
  directory = str(tmp_path / 'ckpt')
  _, (_, second_weights) = _two_backups(directory)
  pointer = os.path.join(directory, 'checkpoint.json')
  with open(pointer) as file:
    text = file.read()
  with open(pointer, 'w') as file:
    file.write(text[:len(text) // 2])
  assert checkpoints.Checkpointer(directory).latest()[1] == 2
  fresh = _model(seed=1)
  assert checkpoints.Checkpointer(directory).restore(fresh) == 2
  assert 'checkpoint.json' in caplog.text
  for want, got in zip(second_weights, fresh.get_weights()):
    np.testing.assert_array_equal(got, want)


def test_no_usable_backup_is_an_error_naming_each(tmp_path):
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / 'ckpt')
  paths, _ = _two_backups(directory)
  for path in paths:
    _overwrite_with_garbage(path)
  with pytest.raises(errors.WorkdirError) as error:
    checkpoints.Checkpointer(directory).restore(_model(seed=1))
  for path in paths:
    assert os.path.basename(path) in str(error.value)


def test_pointer_records_a_checksum_of_each_kept_backup(tmp_path):
  import hashlib  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / 'ckpt')
  paths, _ = _two_backups(directory)
  with open(os.path.join(directory, 'checkpoint.json')) as file:
    state = json.load(file)
  assert [backup['step'] for backup in state['backups']] == [2, 1]
  for backup, path in zip(state['backups'], reversed(paths)):
    with open(path, 'rb') as file:
      assert backup['sha256'] == hashlib.sha256(file.read()).hexdigest()


def test_a_full_disk_is_a_clear_error_and_leaves_no_temporary_file(
    tmp_path, monkeypatch):
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / 'ckpt')
  _two_backups(directory)
  before = sorted(os.listdir(directory))
  usage = shutil.disk_usage(directory)
  monkeypatch.setattr(shutil, 'disk_usage',
                      lambda path: usage._replace(free=1000))
  model = _model()
  with pytest.raises(errors.WorkdirError, match='free') as error:
    checkpoints.Checkpointer(directory).save(model, 3)
  assert directory in str(error.value)
  assert sorted(os.listdir(directory)) == before
  # The space ran out while writing, although the check passed.
  monkeypatch.undo()
  import errno  # pylint: disable=g-import-not-at-top

  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(model, 'save_weights', no_space)
  with pytest.raises(errors.WorkdirError, match='space'):
    checkpoints.Checkpointer(directory).save(model, 3)
  assert sorted(os.listdir(directory)) == before


def test_symlinks_planted_at_temporary_names_are_not_followed(tmp_path):
  """Nothing outside the directory is written through a planted link."""
  directory = tmp_path / 'ckpt'
  directory.mkdir()
  outside = tmp_path / 'outside'
  outside.write_text('precious')
  for name in ('tmp-ckpt-1.weights.h5', 'checkpoint.json.tmp',
               '.tmp-ckpt-1.weights.h5', 'tmp-best.weights.h5',
               'best.json.tmp'):
    os.symlink(outside, directory / name)
  model = _model()
  checkpoints.Checkpointer(str(directory)).save(model, 1)
  callback = callbacks.BestWeightsCallback(str(directory))
  callback.set_model(model)
  callback.on_train_begin()
  callback.on_epoch_end(0, {'val_accuracy': 0.5})
  assert outside.read_text() == 'precious'
