"""Tests of train_and_evaluate's checks: all fail before a model is built."""

import os
import time
import types

import h5py
import keras
from keras.src.legacy.saving import legacy_h5_format
import numpy as np
import pytest
import tensorflow as tf

from configs import cifar10_resnet50
from keras_sft.data import pipeline
from keras_sft import errors
from keras_sft import files
from keras_sft.models import backbones
from keras_sft.models import classifier
from keras_sft.models import network as network_lib
from keras_sft.training import checkpoints
from keras_sft.training import recipe
from keras_sft.training import train
from keras_sft import workdir as workdir_lib


def _smoke_config(**overrides):
  config = cifar10_resnet50.get_config('smoke')
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture
def no_model_built(monkeypatch):
  """Fails the test if any model gets built."""

  def refuse(*args, **kwargs):
    raise AssertionError('A model was built before the bad input was found.')

  monkeypatch.setattr(network_lib, 'build_network', refuse)


@pytest.mark.parametrize('key, value, message', [
    ('global_batch_size', 0, 'global_batch_size=0'),
    ('num_epochs', -1, 'num_epochs=-1'),
    # Checked before head_only_epochs, whose range depends on it: the error
    # names the key the user set.
    ('num_epochs', 0, '^num_epochs must be a positive number'),
    ('num_epochs', -1, '^num_epochs must be a positive number'),
    ('learning_rate', -0.1, 'learning_rate=-0.1'),
    ('steps_per_epoch', 0, 'steps_per_epoch=0'),
    ('distribution', 'mirored', "distribution='mirored'"),
    ('optimizer', 'lamb', "optimizer='lamb'"),
    ('weights', '/no/such/file.h5', '/no/such/file.h5'),
    ('label_smoothing', 1.0, 'label_smoothing=1.0'),
    ('precision', 'float8', "precision='float8'"),
    ('ema_momentum', 1.0, 'ema_momentum=1.0'),
    ('lr_schedule', 'linear', "lr_schedule='linear'"),
    ('resize_size', 16, 'resize_size=16'),
    ('batch_norm', 'sync', "batch_norm='sync'"),
    ('freeze_until', 'conv6', "freeze_until='conv6'"),
    ('head_only_epochs', 2.0, 'head_only_epochs=2.0'),
    ('backbone_learning_rate_multiplier', -1.0,
     'backbone_learning_rate_multiplier=-1.0'),
    ('cutmix_alpha', 2.0, 'cutmix_alpha=2.0'),
    ('randaugment_magnitude', 3.0, 'randaugment_magnitude=3.0'),
    ('layer_decay', 1.5, 'layer_decay=1.5'),
    ('clip_global_norm', -1.0, 'clip_global_norm=-1.0'),
    ('weight_decay_target', 'pretrained', 'weights=None'),
    ('random_erasing_probability', 1.5, 'random_erasing_probability=1.5'),
    ('class_weight', 'inverse', "class_weight='inverse'"),
    ('sampling', 'oversample', "sampling='oversample'"),
])
def test_bad_values_are_named(tmp_path, no_model_built, key, value, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    train.train_and_evaluate(_smoke_config(**{key: value}), str(tmp_path))


def test_batch_not_divisible_by_replicas(tmp_path, no_model_built,
                                         mock_cifar10):
  """Two replicas cannot split a global batch of 7."""
  config = _smoke_config(distribution='mirrored', global_batch_size=7)
  with pytest.raises(ValueError, match='global_batch_size=7.*2 replicas'):
    train.train_and_evaluate(config, str(tmp_path))


def test_micro_batches_not_dividing_the_replica_batch(tmp_path,
                                                     no_model_built,
                                                     mock_cifar10):
  """8 images on 2 replicas are 4 each: k=8 divides 8 but not 4."""
  config = _smoke_config(distribution='mirrored', global_batch_size=8,
                         gradient_accumulation_steps=8)
  with pytest.raises(ValueError, match=r'2 replica\(s\) = 4'):
    train.train_and_evaluate(config, str(tmp_path))


def test_workdir_of_another_run_is_refused(tmp_path, no_model_built,
                                           mock_cifar10):
  workdir = str(tmp_path)
  # This start claims the workdir, then stops where the model is built.
  with pytest.raises(AssertionError, match='A model was built'):
    train.train_and_evaluate(_smoke_config(), workdir)
  changed = _smoke_config(learning_rate=0.5)
  with pytest.raises(ValueError, match='holds another run.*learning_rate'):
    train.train_and_evaluate(changed, workdir)


def _weights_file(directory, kind):
  """A weights file that does not fit the smoke config's ResNet50."""
  path = str(directory / 'weights.h5')
  if kind == 'not_hdf5':
    with open(path, 'wb') as file:
      file.write(b'<html>not weights</html>')
    return path
  # Legacy .h5, as Keras' downloads, of another (tiny) model.
  inputs = keras.Input((8, 8, 3))
  other = keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs))
  with h5py.File(path, 'w') as file:
    legacy_h5_format.save_weights_to_hdf5_group(file, other)
  if kind == 'truncated':  # An interrupted copy: HDF5 header, no end.
    os.truncate(path, os.path.getsize(path) // 2)
  return path


@pytest.mark.parametrize('key, value, message', [
    ('image_size', 0, 'image_size=0'),
    ('image_size', 16, 'image_size=16'),
    ('dataset', 'no_such_dataset', 'no_such_dataset'),
    ('weights', 'not_hdf5', 'not an HDF5'),
    ('weights', 'truncated', 'truncated'),
    ('weights', 'another_model', 'does not fit'),
    # Offline: the error names --config.weights=PATH, which must then run in
    # the same workdir.
    ('weights', 'imagenet', 'Could not download'),
    # Values that would fail only while building the model or the input
    # stream, after the claim (image_size: a numpy MemoryError).
    ('image_size', 100_000_000, 'image_size must be at most 4,096'),
    ('resize_size', 100_000_000, 'resize_size must be at most 4,096'),
    ('global_batch_size', 100_000_000, 'global_batch_size must be at most'),
    ('shuffle_buffer_size', 10**12, 'shuffle_buffer_size must be at most'),
    ('randaugment_num_ops', 100_000_000, 'randaugment_num_ops must be at'),
    ('max_image_pixels', 10**30, 'max_image_pixels must be at most'),
    ('seed', 2**32, 'seed must be at most'),
    ('export_representative_images', 10**12,
     'export_representative_images must be at most'),
])
def test_a_failed_start_leaves_the_workdir_unclaimed(
    tmp_path, monkeypatch, no_model_built, mock_cifar10, key, value,
    message):
  """Config, data and weights are checked before the workdir is claimed."""
  if key == 'weights' and value != 'imagenet':
    value = _weights_file(tmp_path, value)
  monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras'))
  workdir = tmp_path / 'run'
  with pytest.raises((ValueError, errors.UnavailableError), match=message):
    train.train_and_evaluate(_smoke_config(**{key: value}), str(workdir))
  assert not workdir.exists()


def test_offline_dataset_fails_fast_naming_the_routes(tmp_path,
                                                      no_model_built):
  """No network and no data: an error within seconds, with the way out."""
  config = _smoke_config(data_dir=str(tmp_path / 'tfds'))
  start = time.time()
  with pytest.raises(pipeline.DatasetUnavailableError) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert time.time() - start < 30
  assert 'downloads/manual' in str(error.value)
  assert 'cifar-10-binary.tar.gz' in str(error.value)


def test_offline_imagenet_weights_fail_fast_naming_the_routes(
    tmp_path, monkeypatch):
  monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras'))
  start = time.time()
  with pytest.raises(backbones.WeightsUnavailableError) as error:
    network_lib.create_network(10, 32, weights='imagenet')
  assert time.time() - start < 30
  assert backbones.BACKBONES['resnet50'].weights_file in str(error.value)
  assert '--config.weights' in str(error.value)
  assert str(tmp_path / 'keras' / 'models') in str(error.value)


def test_local_weights_file_is_loaded(tmp_path):
  """weights=<path> loads that file (the offline route for ImageNet)."""
  source = network_lib.create_network(10, 32, weights=None)
  backbone = source.get_layer('resnet50')
  path = str(tmp_path / backbones.BACKBONES['resnet50'].weights_file).replace(
      '.h5', '.weights.h5')
  backbone.save_weights(path)
  keras.utils.set_random_seed(7)
  loaded = network_lib.create_network(10, 32, weights=path)
  for expected, actual in zip(backbone.weights,
                              loaded.get_layer('resnet50').weights):
    assert (keras.ops.convert_to_numpy(expected) ==
            keras.ops.convert_to_numpy(actual)).all(), expected.path


@pytest.mark.parametrize('overrides, message', [
    # smoke: 2 steps per epoch, 2 eval steps.
    ({'steps_per_execution': 3}, 'steps_per_epoch=2.*steps_per_execution=3'),
    ({'steps_per_execution': 2, 'eval_steps': 3},
     'eval_steps=3.*steps_per_execution=2'),
    # 64 mock examples // 8 = 8 derived steps per epoch.
    ({'steps_per_execution': 3, 'steps_per_epoch': None, 'eval_steps': None},
     'steps_per_epoch=8.*steps_per_execution=3'),
])
def test_steps_per_execution_must_divide_the_steps(tmp_path, no_model_built,
                                                   mock_cifar10, overrides,
                                                   message):
  """Keras runs whole executions: k=3 on 2 steps/epoch would run 3 a epoch."""
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(_smoke_config(**overrides), str(workdir))
  assert not workdir.exists()


_TINY_SHAPE = (6, 6, 3)


def _tiny_run(workdir, steps_per_epoch=4, num_epochs=2, steps_per_execution=1,
              learning_rate=0.1, dropout_rate=0.0, checkpoint_every_steps=1,
              options=None):
  """A `train._Run` of a tiny Classifier on 8 random batches of 4, cycled.

  Returns `(run, build)`: `build(seed=0)` makes the run's compiled model
  (initialized from `seed`) and restores its newest backup, as
  `train._build` does for ResNet50. `options`: more `Classifier` arguments;
  then a hidden Dense layer (a "backbone" kernel) comes before the head.
  """
  config = _smoke_config(steps_per_epoch=steps_per_epoch,
                         num_epochs=num_epochs, eval_steps=None,
                         steps_per_execution=steps_per_execution,
                         checkpoint_every_steps=checkpoint_every_steps)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(32,) + _TINY_SHAPE).astype(np.float32)
  labels = rng.integers(0, 3, 32).astype(np.int64)
  examples = tf.data.Dataset.from_tensor_slices((images, labels))

  def train_stream(start_step, labeled_only=False):
    del labeled_only  # No unlabelled images here.
    return examples.batch(4).repeat().skip(start_step)

  data = types.SimpleNamespace(
      train=train_stream,
      eval=examples.batch(8),
      info=types.SimpleNamespace(num_classes=3, class_names=('a', 'b', 'c'),
                                 num_train_examples=32))
  run = train._Run(  # pylint: disable=protected-access
      config=config, workdir=workdir_lib.Workdir(str(workdir)),
      strategy=tf.distribute.get_strategy(), chief=True, data=data,
      plan=recipe.Plan(steps_per_epoch=steps_per_epoch,
                       total_steps=steps_per_epoch * num_epochs,
                       warmup_steps=0, peak_learning_rate=learning_rate,
                       head_only_steps=0),
      checkpointer=checkpoints.Checkpointer(
          os.path.join(str(workdir), 'checkpoints')))
  os.makedirs(str(workdir), exist_ok=True)

  def build(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(_TINY_SHAPE)
    x = keras.layers.Flatten()(inputs)
    if options:
      x = keras.layers.Dense(5, name='hidden')(x)
    if dropout_rate:
      x = keras.layers.Dropout(dropout_rate, seed=0)(x)
    outputs = keras.layers.Dense(3, name='head')(x)
    model = classifier.Classifier(keras.Model(inputs, outputs),
                                  **(options or {}))
    recipe.compile_model(model, keras.optimizers.SGD(learning_rate),
                         steps_per_execution=steps_per_execution)
    model(np.zeros((1,) + _TINY_SHAPE, np.float32))
    model.optimizer.build(model.trainable_variables)
    run.checkpointer.restore(model)
    return model

  return run, build


def test_resumed_epoch_off_the_execution_grid_is_refused(tmp_path):
  """A resume whose remainder k does not divide would run extra steps."""
  run, build = _tiny_run(tmp_path / 'run', steps_per_epoch=4,
                         steps_per_execution=2)
  model = build()
  model.step_counter.assign(1)  # 3 steps left in the epoch, k=2.
  with pytest.raises(ValueError, match='step 1.*steps_per_execution=2'):
    train._fit_to_end(run, model)  # pylint: disable=protected-access
  assert checkpoints.trained_steps(model) == 1


def test_resumed_run_with_steps_per_execution_takes_exactly_its_steps(
    tmp_path):
  run, build = _tiny_run(tmp_path / 'run', steps_per_epoch=4,
                         steps_per_execution=2)
  model = build()
  model.step_counter.assign(2)  # Resumed mid-epoch, on the grid.
  assert train._fit_to_end(run, model)  # pylint: disable=protected-access
  assert checkpoints.trained_steps(model) == 8
  assert int(model.optimizer.iterations.numpy()) == 6


def test_resumed_run_with_dropout_equals_an_uninterrupted_one(tmp_path):
  """Backup at step 3, a fresh process's model restores it and goes on."""
  run, build = _tiny_run(tmp_path / 'whole', dropout_rate=0.5)
  uninterrupted = build()
  train._fit_to_end(run, uninterrupted)  # pylint: disable=protected-access

  run, build = _tiny_run(tmp_path / 'resumed', dropout_rate=0.5)
  first = build()
  train._fit(run, first, end_epoch=1, steps=3)  # pylint: disable=protected-access
  assert run.checkpointer.latest()[1] == 3
  resumed = build()  # Restores step 3; its dropout state is new.
  assert checkpoints.trained_steps(resumed) == 3
  train._fit_to_end(run, resumed)  # pylint: disable=protected-access

  assert checkpoints.trained_steps(resumed) == 8
  for want, got in zip(uninterrupted.get_weights(), resumed.get_weights()):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_resumed_run_with_l2_sp_clipping_and_accumulation_is_exact(tmp_path):
  """The backup restores L2-SP's w₀: a rebuild from other weights (other
  anchors) resumes to the uninterrupted run's weights."""
  options = dict(weight_decay=0.05, weight_decay_target='pretrained',
                 clip_global_norm=0.1, gradient_accumulation_steps=2)
  run, build = _tiny_run(tmp_path / 'whole', options=options)
  uninterrupted = build()
  train._fit_to_end(run, uninterrupted)  # pylint: disable=protected-access

  run, build = _tiny_run(tmp_path / 'resumed', options=options)
  first = build()
  train._fit(run, first, end_epoch=1, steps=3)  # pylint: disable=protected-access
  resumed = build(seed=1)
  [anchor] = resumed.anchors.values()
  [uninterrupted_anchor] = uninterrupted.anchors.values()
  np.testing.assert_array_equal(anchor, uninterrupted_anchor)
  assert checkpoints.trained_steps(resumed) == 3
  train._fit_to_end(run, resumed)  # pylint: disable=protected-access

  assert checkpoints.trained_steps(resumed) == 8
  assert int(resumed.optimizer.iterations.numpy()) == 8
  for want, got in zip(uninterrupted.get_weights(), resumed.get_weights()):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # The run moved away from w₀, so the anchors mattered.
  assert not np.allclose(resumed.network.get_layer('hidden').kernel, anchor)


def test_precise_bn_batches_are_capped_at_one_pass_and_logged(tmp_path,
                                                              caplog):
  """precise_bn_batches=10**11 took 10**11 batches of an endless stream."""
  run, _ = _tiny_run(tmp_path / 'run')
  run.config.precise_bn_batches = 10**11
  run.config.global_batch_size = 4  # As the tiny run's stream batches.
  batches = train._statistics_batches(run)  # pylint: disable=protected-access
  # 32 examples in batches of 4 (drop_remainder): 8 batches, each image once.
  assert int(batches.cardinality()) == 8
  with caplog.at_level('WARNING'):
    from keras_sft.models import precise_bn  # pylint: disable=g-import-not-at-top
    precise_bn.log_if_capped(10**11, 32, 4)
  assert 'precise_bn_batches=100000000000 is more than one pass' in caplog.text
  assert 'those 8 batches' in caplog.text


def _history_epochs(workdir):
  import csv  # pylint: disable=g-import-not-at-top
  with open(workdir_lib.Workdir(str(workdir)).history_csv) as file:
    return [row['epoch'] for row in csv.DictReader(file)]


def test_history_columns_hold_after_a_resume_with_sparse_validation(
    tmp_path):
  """eval_every_epochs=2, stopped after epoch 1 (no validation yet), resumed:
  the hostile pass found the resumed rows shifted under the first header
  (which also had a val_learning_rate column)."""
  import csv  # pylint: disable=g-import-not-at-top
  run, build = _tiny_run(tmp_path / 'run', steps_per_epoch=2, num_epochs=2)
  run.config.eval_every_epochs = 2
  train._fit(run, build(), 1, 2)  # pylint: disable=protected-access
  train._fit_to_end(run, build())  # pylint: disable=protected-access
  with open(run.workdir.history_csv, newline='') as file:
    rows = list(csv.reader(file))
  header = rows[0]
  assert 'val_learning_rate' not in header and 'val_loss' in header
  assert all(len(row) == len(header) for row in rows), rows
  last = dict(zip(header, rows[-1]))
  assert last['epoch'] == '1'
  assert float(last['val_loss']) > 0 and last['learning_rate'] != 'NA'


def test_resume_does_not_repeat_rows_of_history_csv(tmp_path):
  """Rows of epochs the resumed run trains again are replaced, not added."""
  run, build = _tiny_run(tmp_path / 'run', steps_per_epoch=4)
  model = build()
  train._fit(run, model, end_epoch=1, steps=4)  # pylint: disable=protected-access
  # Epoch 1 stops after 2 of its 4 steps (as a preempted or NaN-stopped fit
  # does), and its partial row is written.
  train._fit(run, model, end_epoch=2, steps=2)  # pylint: disable=protected-access
  assert _history_epochs(tmp_path / 'run') == ['0', '1']
  resumed = build()
  assert checkpoints.trained_steps(resumed) == 6
  train._fit_to_end(run, resumed)  # pylint: disable=protected-access
  assert _history_epochs(tmp_path / 'run') == ['0', '1']


def _float_keys():
  """Every key of the default config that holds a float (or float list)."""
  from configs import default as default_lib  # pylint: disable=g-import-not-at-top
  config = default_lib.get_config()
  keys = []
  for key in config.keys():
    reference = config.get_ref(key)
    value = config[key]
    if (reference.get_type() is float or isinstance(value, float) or
        (isinstance(value, (tuple, list)) and value and
         all(isinstance(item, float) for item in value))):
      keys.append(key)
  return keys


@pytest.mark.parametrize('key', _float_keys())
@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_non_finite_float_values_are_refused(tmp_path, no_model_built, key,
                                             bad):
  """No float key takes NaN or ±inf (--config.learning_rate=nan passed)."""
  config = _smoke_config()
  config[key] = (bad,) if isinstance(config[key], (tuple, list)) else bad
  with pytest.raises(ValueError, match=key):
    train.check_config(config)


def test_finish_refuses_non_finite_weights_and_writes_nothing(tmp_path):
  run, build = _tiny_run(tmp_path / 'run')
  model = build()
  kernel = model.network.get_layer('head').kernel
  kernel.assign(np.full(kernel.shape, np.inf, np.float32))
  with pytest.raises(FloatingPointError, match='not finite'):
    train._finish(run, model, export=True)  # pylint: disable=protected-access
  assert not os.path.exists(run.workdir.metrics_file)
  assert not os.path.exists(run.workdir.export)


def test_diverging_run_stops_and_names_a_finite_backup(tmp_path, mock_cifar10):
  """learning_rate=1e5: the weights stay finite, the outputs do not."""
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  import conftest  # pylint: disable=g-import-not-at-top
  workdir = workdir_lib.Workdir(str(tmp_path / 'run'))
  with pytest.raises(errors.DivergedError) as error:
    train.train_and_evaluate(_smoke_config(learning_rate=1e5), workdir.path)
  path, step = conftest.latest_backup(workdir.path)
  assert path in str(error.value) and f'step {step}' in str(error.value)
  assert not os.path.exists(workdir.export)
  assert not os.path.exists(workdir.metrics_file)
  # Its val_accuracy was finite, its val_loss not: no best weights either.
  assert not os.path.exists(os.path.join(workdir.checkpoints,
                                         checkpoints.BEST_WEIGHTS))
  backups = [name for name in os.listdir(workdir.checkpoints)
             if name.endswith('.weights.h5')]
  assert backups
  for name in backups:
    for array_name, array in conftest.backup_arrays(
        os.path.join(workdir.checkpoints, name)).items():
      assert np.isfinite(array).all(), (name, array_name)


def test_a_workdir_in_use_is_refused_before_any_model_is_built(
    tmp_path, no_model_built, mock_cifar10):
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  workdir = workdir_lib.Workdir(str(tmp_path / 'run'))
  os.makedirs(workdir.path)
  with workdir.lock():
    with pytest.raises(errors.WorkdirError, match=f'PID {os.getpid()}'):
      train.train_and_evaluate(_smoke_config(), workdir.path)
  assert not workdir.has_run()


def test_renamed_class_folder_is_refused_on_resume(tmp_path, no_model_built):
  """The same command after a class folder was renamed: not new labels."""
  import image_fixtures  # pylint: disable=g-import-not-at-top
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'data'
  image_fixtures.write_image_folder(str(root))
  config = _smoke_config(dataset=f'folder:{root}', global_batch_size=4,
                         eval_steps=None)
  workdir = str(tmp_path / 'run')
  # Claims the workdir, then stops where the model would be built.
  with pytest.raises(AssertionError, match='A model was built'):
    train.train_and_evaluate(config, workdir)
  for split in ('train', 'test'):
    os.rename(root / split / 'dog', root / split / 'wolf')
  with pytest.raises(errors.WorkdirError, match='class_names'):
    train.train_and_evaluate(config, workdir)


def _claim_folder_run(tmp_path):
  """A folder run whose workdir is claimed: `(config, workdir, root)`."""
  import image_fixtures  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'data'
  image_fixtures.write_image_folder(str(root))
  config = _smoke_config(dataset=f'folder:{root}', global_batch_size=4,
                         eval_steps=None)
  workdir = str(tmp_path / 'run')
  # Claims the workdir, then stops where the model would be built.
  with pytest.raises(AssertionError, match='A model was built'):
    train.train_and_evaluate(config, workdir)
  return config, workdir, root


def test_files_the_reader_ignores_do_not_refuse_a_resume(tmp_path,
                                                         no_model_built):
  """A README or .DS_Store added to the data folder refused the resume."""
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  config, workdir, root = _claim_folder_run(tmp_path)
  (root / 'README.md').write_text('Where these images come from.')
  (root / 'train' / '.DS_Store').write_bytes(b'\0' * 10)
  (root / 'test' / 'cat' / 'notes.txt').write_text('blurry: 3.png')
  (root / 'val' / 'cat').mkdir(parents=True)  # A split the run does not read.
  (root / 'val' / 'cat' / '0.png').write_bytes(
      (root / 'test' / 'cat' / '0.png').read_bytes())
  with pytest.raises(AssertionError, match='A model was built'):
    train.train_and_evaluate(config, workdir)
  # An image the run reads, changed: refused.
  os.remove(root / 'train' / 'cat' / '0.png')
  with pytest.raises(errors.WorkdirError, match='files'):
    train.train_and_evaluate(config, workdir)


def test_a_run_with_the_legacy_fingerprint_resumes(tmp_path, no_model_built):
  """dataset.json of a run started before the fingerprint was of images."""
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  config, workdir, root = _claim_folder_run(tmp_path)
  (root / 'notes.txt').write_text('In the folder when the run started.')
  run = workdir_lib.Workdir(workdir)
  recorded = files.read_json(run.dataset_file)
  new_fingerprint = recorded['files']
  # What keras-sft wrote before: every file under the folder, notes too.
  legacy = workdir_lib.legacy_fingerprint_files(str(root))
  assert legacy['count'] == new_fingerprint['count'] + 1
  files.write_json(run.dataset_file, {**recorded, 'files': legacy})
  with pytest.raises(AssertionError, match='A model was built'):
    train.train_and_evaluate(config, workdir)
  # The resume recorded the new fingerprint.
  assert files.read_json(run.dataset_file)['files'] == new_fingerprint
  # A legacy record of other data is still refused.
  files.write_json(run.dataset_file, {**recorded, 'files': legacy})
  os.remove(root / 'train' / 'cat' / '0.png')
  with pytest.raises(errors.WorkdirError, match='files'):
    train.train_and_evaluate(config, workdir)


def test_start_removes_temporary_files_of_killed_writers(
    tmp_path, no_model_built, mock_cifar10):
  workdir = workdir_lib.Workdir(str(tmp_path / 'run'))
  os.makedirs(workdir.checkpoints)
  leftovers = [os.path.join(workdir.checkpoints, '.tmp-k2j'),
               workdir.metrics_file + '.tmp']
  os.makedirs(leftovers[0])
  open(leftovers[1], 'w').close()
  with pytest.raises(AssertionError, match='A model was built'):
    train.train_and_evaluate(_smoke_config(), workdir.path)
  for path in leftovers:
    assert not os.path.exists(path)


class _SendSigterm(keras.callbacks.Callback):
  """Sends this process SIGTERM at the end of step `at_step`."""

  def __init__(self, at_step):
    super().__init__()
    self.at_step = at_step

  def on_train_batch_end(self, batch, logs=None):
    if checkpoints.trained_steps(self.model) == self.at_step:
      import signal  # pylint: disable=g-import-not-at-top
      os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_backs_up_at_the_next_step_and_stops(tmp_path, monkeypatch):
  """Preemption: a backup of step 3 (not an epoch end, no N-step backup)."""
  import signal  # pylint: disable=g-import-not-at-top
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  run, build = _tiny_run(tmp_path / 'whole', checkpoint_every_steps=1000)
  uninterrupted = build()
  train._fit_to_end(run, uninterrupted)  # pylint: disable=protected-access

  run, build = _tiny_run(tmp_path / 'run', checkpoint_every_steps=1000)
  # After the run's own callbacks, before PreemptionCallback.
  run.extra_callbacks = (_SendSigterm(3),)
  with pytest.raises(errors.PreemptedError, match='step 3'):
    train._fit_to_end(run, build())  # pylint: disable=protected-access
  assert run.checkpointer.latest()[1] == 3
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  run.extra_callbacks = ()
  resumed = build()
  train._fit_to_end(run, resumed)  # pylint: disable=protected-access
  for want, got in zip(uninterrupted.get_weights(), resumed.get_weights()):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_sigterm_at_an_epoch_end_keeps_the_epochs_history_row(tmp_path,
                                                              monkeypatch):
  """Stopped at the last step of epoch 1: its evaluation and row still come
  before the backup of that step, so no epoch goes missing from history."""
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  run, build = _tiny_run(tmp_path / 'run', steps_per_epoch=4)
  # After the run's own callbacks, before PreemptionCallback.
  run.extra_callbacks = (_SendSigterm(4),)
  with pytest.raises(errors.PreemptedError, match='step 4'):
    train._fit_to_end(run, build())  # pylint: disable=protected-access
  assert _history_epochs(tmp_path / 'run') == ['0']
  run.extra_callbacks = ()
  train._fit_to_end(run, build())  # pylint: disable=protected-access
  assert _history_epochs(tmp_path / 'run') == ['0', '1']


class _SendSigtermDuringValidation(keras.callbacks.Callback):
  """Sends SIGTERM after the first validation batch; counts those after."""

  def __init__(self):
    super().__init__()
    self.sent = False
    self.batches_after = 0

  def on_test_batch_end(self, batch, logs=None):
    if self.sent:
      self.batches_after += 1
      return
    import signal  # pylint: disable=g-import-not-at-top
    self.sent = True
    os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_validation_stops_at_once_and_the_rerun_redoes_it(
    tmp_path, monkeypatch):
  """Between steps (evaluation, precise BN, EMA swap) SIGTERM was only a
  flag read at the epoch end, after the whole evaluation."""
  import signal  # pylint: disable=g-import-not-at-top
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  run, build = _tiny_run(tmp_path / 'run', steps_per_epoch=4)
  sender = _SendSigtermDuringValidation()
  # After the run's own callbacks, before PreemptionCallback.
  run.extra_callbacks = (sender,)
  with pytest.raises(errors.PreemptedError, match='between training steps'):
    train._fit_to_end(run, build())  # pylint: disable=protected-access
  assert sender.sent and sender.batches_after == 0
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  # The epoch's last step is backed up after its evaluation: not written.
  assert run.checkpointer.latest()[1] == 3
  run.extra_callbacks = ()
  resumed = build()
  train._fit_to_end(run, resumed)  # pylint: disable=protected-access
  assert checkpoints.trained_steps(resumed) == 8
  assert _history_epochs(tmp_path / 'run') == ['0', '1']


class _RecordBackupAtValidation(keras.callbacks.Callback):

  def __init__(self, checkpointer):
    super().__init__()
    self.checkpointer = checkpointer
    self.steps = []

  def on_test_begin(self, logs=None):
    self.steps.append(self.checkpointer.latest()[1])


def test_epoch_end_backup_comes_after_the_epochs_evaluation(tmp_path,
                                                            monkeypatch):
  """A kill during an epoch's evaluation resumes before its last step, so
  the rerun evaluates the epoch and writes its row (backups every step)."""
  run, build = _tiny_run(tmp_path / 'run', steps_per_epoch=4)
  recorder = _RecordBackupAtValidation(run.checkpointer)
  # After the run's own callbacks, before PreemptionCallback.
  run.extra_callbacks = (recorder,)
  train._fit_to_end(run, build())  # pylint: disable=protected-access
  assert recorder.steps == [3, 7]
  assert run.checkpointer.latest()[1] == 8


def test_export_on_a_full_disk_is_a_clear_error(tmp_path, monkeypatch):
  """Found by benchmarks/soak.py: TF's SaveV2 traceback on ENOSPC."""
  import shutil  # pylint: disable=g-import-not-at-top
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  from keras_sft.export import saved_model  # pylint: disable=g-import-not-at-top
  run, build = _tiny_run(tmp_path / 'run')
  model = build()

  def no_space(*args, **kwargs):
    raise tf.errors.ResourceExhaustedError(
        None, None, '/x/variables/part-0; No space left on device')

  monkeypatch.setattr(saved_model, 'export_version', no_space)
  with pytest.raises(errors.WorkdirError, match='space.*rerun'):
    train._finish(run, model, export=True)  # pylint: disable=protected-access
  usage = shutil.disk_usage(run.workdir.path)
  monkeypatch.setattr(shutil, 'disk_usage',
                      lambda path: usage._replace(free=1000))
  with pytest.raises(errors.WorkdirError, match='free space'):
    train._finish(run, model, export=True)  # pylint: disable=protected-access


def test_finish_fits_the_temperature_on_the_calibration_split(
    tmp_path, monkeypatch):
  """Issue 23: T is fitted on the calibration batches (not the eval split)
  with the final weights, recorded in calibration.json and metrics.json,
  the report gives the eval split's ECE before and after, and the export
  is handed the record."""
  from keras_sft.export import saved_model  # pylint: disable=g-import-not-at-top
  from keras_sft.training import calibration  # pylint: disable=g-import-not-at-top
  from keras_sft.training import evaluation  # pylint: disable=g-import-not-at-top
  run, build = _tiny_run(tmp_path / 'run')
  model = build()
  kernel = model.network.get_layer('head').kernel
  # Large weights: over-confident logits, so T is well above 1.
  kernel.assign(np.random.default_rng(5).normal(
      0, 3, kernel.shape).astype(np.float32))
  rng = np.random.default_rng(6)
  images = rng.normal(size=(40,) + _TINY_SHAPE).astype(np.float32)
  labels = rng.integers(0, 3, 40).astype(np.int64)
  run.config.calibration_split = 'val'
  run.calibration = (tf.data.Dataset.from_tensor_slices(
      (images, labels)).batch(16), 40)
  exported = {}
  monkeypatch.setattr(saved_model, 'export_from_config',
                      lambda *args, **kwargs: exported.update(kwargs))
  metrics = train._finish(run, model, export=True)  # pylint: disable=protected-access

  logits = model.predict(images, verbose=0)
  temperature = calibration.fit_temperature(logits, labels)
  record = metrics['calibration']
  assert record['temperature'] == pytest.approx(temperature, rel=1e-5)
  assert record['temperature'] > 1.5
  assert record['split'] == 'val' and record['num_examples'] == 40
  assert record['step'] == metrics['step']
  assert files.read_json(run.workdir.calibration_file) == record
  eval_labels, eval_logits = evaluation.predict(model, run.data.eval)
  report = metrics['report']['calibration']
  assert report['temperature'] == record['temperature']
  assert report['ece'] == pytest.approx(
      calibration.expected_calibration_error(
          calibration.softmax(eval_logits), eval_labels))
  assert report['ece_calibrated'] == pytest.approx(
      calibration.expected_calibration_error(
          calibration.softmax(eval_logits, temperature), eval_labels),
      abs=1e-5)
  assert os.path.exists(run.workdir.reliability_png)
  assert exported['calibration'] == record

  # Off: no T, no record left behind, the export gets none.
  run.config.calibration_split = None
  run.calibration = None
  exported.clear()
  metrics = train._finish(run, model, export=True)  # pylint: disable=protected-access
  assert 'calibration' not in metrics
  assert 'ece_calibrated' not in metrics['report']['calibration']
  assert not os.path.exists(run.workdir.calibration_file)
  assert exported['calibration'] is None


def test_a_missing_calibration_split_fails_before_training(
    tmp_path, no_model_built):
  import image_fixtures  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / 'images')
  image_fixtures.write_image_folder(root)
  config = _smoke_config(dataset=f'folder:{root}', global_batch_size=4,
                         calibration_split='val')
  with pytest.raises(errors.PathNotFoundError, match='val'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'config.json')
