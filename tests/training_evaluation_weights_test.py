"""Tests of keras_sft.training.evaluation_weights: EMA and precise BN, as exported."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
from configs import cifar10_resnet50
from keras_sft.export import restore
from keras_sft.models import batch_norm
from keras_sft.models import classifier
from keras_sft.training import callbacks
from keras_sft.training import checkpoints
from keras_sft.training import evaluation_weights
from keras_sft.training import optimizers
from keras_sft.training import train
from keras_sft import workdir as workdir_lib


def _tiny_model():
  keras.utils.set_random_seed(0)
  inputs = keras.Input((4, 4, 3))
  x = keras.layers.Conv2D(4, 3, padding='same')(inputs)
  x = batch_norm.BatchNormalization(name='bn')(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  network = keras.Model(inputs, keras.layers.Dense(3, name='head')(x))
  model = classifier.Classifier(network)
  model.compile(optimizer=optimizers.create_optimizer('sgd', 0.5,
                                                      ema_momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True), metrics=['accuracy'])
  return model


def _data():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(32, 4, 4, 3)) * 2 + 3).astype(np.float32)
  y = rng.integers(0, 3, 32)
  return x, y, tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


class _Probe(keras.callbacks.Callback):
  """Records the weights seen by validation and at the end of each epoch."""

  def __init__(self):
    super().__init__()
    self.validated, self.after = [], []

  def on_test_batch_begin(self, batch, logs=None):
    if batch == 0:
      self.validated.append([np.array(v) for v in self.model.variables])

  def on_epoch_end(self, epoch, logs=None):
    self.after.append([np.array(v) for v in self.model.variables])


def test_validation_and_best_use_ema_with_its_own_statistics(tmp_path):
  x, y, batches = _data()
  model = _tiny_model()
  probe_validation, probe_after = _Probe(), _Probe()
  raw = []

  class _Raw(keras.callbacks.Callback):

    def on_epoch_end(self, epoch, logs=None):
      raw.append([np.array(v) for v in self.model.variables])

  fit_callbacks = [
      _Raw(),  # Before: sees the evaluation weights still in place.
      probe_validation,
      callbacks.BestWeightsCallback(str(tmp_path)),
      evaluation_weights.EvaluationWeights(ema=True,
                                           statistics_batches=lambda: batches),
      probe_after,
  ]
  history = model.fit(batches, validation_data=batches, epochs=2, verbose=0,
                      callbacks=fit_callbacks)
  # fit's final EMA swap is undone: the model holds the training state of
  # the last epoch end, from which a resumed run goes on.
  final = {v.path: np.array(v) for v in model.variables}
  for path, value in zip([v.path for v in model.variables],
                         probe_after.after[-1]):
    np.testing.assert_array_equal(final[path], value, err_msg=path)
  # Validation saw the EMA weights and BN statistics re-estimated for them.
  validated = probe_validation.validated[0]
  after = probe_after.after[0]
  bn = model.network.get_layer('bn')
  names = [v.path for v in model.variables]
  moving = names.index(bn.moving_mean.path)
  assert not np.allclose(validated[moving], after[moving])
  # After the epoch, training goes on from its own state (what backups hold).
  kernel = names.index(model.network.get_layer('head').kernel.path)
  assert not np.allclose(validated[kernel], after[kernel])
  np.testing.assert_array_equal(raw[0][kernel], validated[kernel])
  # best.weights.h5 holds the weights whose val_accuracy was logged.
  best = _tiny_model()
  best(x[:1])
  best.optimizer.build(best.trainable_variables)
  best.load_weights(os.path.join(tmp_path, checkpoints.BEST_WEIGHTS))
  with open(os.path.join(tmp_path, 'best.json')) as file:
    logged = json.load(file)['value']
  assert logged == max(history.history['val_accuracy'])
  accuracy = best.evaluate(batches, return_dict=True, verbose=0)['accuracy']
  assert accuracy == pytest.approx(logged)


def _config(**overrides):
  config = cifar10_resnet50.get_config('smoke')
  config.ema_momentum = 0.5
  config.precise_bn_batches = 2
  config.checkpoint_every_steps = 1
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope='module')
def ema_run(tmp_path_factory):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp('ema')
  workdir = str(directory / 'run')
  with tfds.testing.mock_data(num_examples=64):
    metrics = train.train_and_evaluate(_config(), workdir)
  yield workdir, metrics
  shutil.rmtree(directory, ignore_errors=True)  # ~1.2 GB of backups.


def test_run_measures_raw_and_ema_and_exports_what_it_evaluated(ema_run,
                                                                mock_cifar10):
  workdir, metrics = ema_run
  assert set(metrics) >= {'eval_raw', 'eval_ema', 'exported_weights'}
  assert metrics['eval'] == metrics[f'eval_{metrics["exported_weights"]}']
  model, config, _, _ = restore.restore_run_model(workdir, 'last')
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3),
                                             dtype=np.uint8)
  served = tf.saved_model.load(workdir_lib.Workdir(workdir).export + '/1')
  logits = served.signatures['serving_default'](
      images=tf.constant(images))['logits'].numpy()
  np.testing.assert_allclose(model.predict(images.astype(np.float32),
                                           verbose=0), logits,
                             rtol=1e-4, atol=1e-4)
  del config


def test_resumed_mid_epoch_ends_equal_with_ema_and_precise_bn(
    ema_run, tmp_path, mock_cifar10, monkeypatch):
  reference, _ = ema_run
  workdir = str(tmp_path / 'run')

  back_up = callbacks.BackupCallback.on_train_batch_end

  def stop_at_step_three(self, batch, logs=None):
    back_up(self, batch, logs)
    if checkpoints.trained_steps(self.model) == 3:
      raise KeyboardInterrupt('simulated kill after the backup of step 3')

  with monkeypatch.context() as patch:
    patch.setattr(callbacks.BackupCallback, 'on_train_batch_end',
                  stop_at_step_three)
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(_config(), workdir)
  assert checkpoints.Checkpointer(
      workdir_lib.Workdir(workdir).checkpoints).latest()[1] == 3
  train.train_and_evaluate(_config(), workdir)
  arrays = [conftest.backup_arrays(conftest.latest_backup(w)[0])
            for w in (workdir, reference)]
  assert arrays[0].keys() == arrays[1].keys()
  for name in arrays[1]:
    np.testing.assert_allclose(arrays[0][name], arrays[1][name], atol=1e-5,
                               err_msg=name)
  for name in ('best.weights.h5',):
    assert os.path.exists(os.path.join(
        workdir_lib.Workdir(workdir).checkpoints, name))
