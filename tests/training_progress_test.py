"""Tests of keras_sft.training.progress: progress lines and the learning rate."""

import logging

import keras
import numpy as np

from keras_sft.training import progress


def _tiny_model():
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
  model.compile(optimizer=keras.optimizers.SGD(0.1),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
  return model


def test_step_logger_logs_every_n_steps_with_rate_and_eta(caplog):
  model = _tiny_model()
  x = np.zeros((28, 3), np.float32)
  y = np.zeros((28,), np.int64)
  logger = progress.StepLogger(every_steps=3, total_steps=7,
                               global_batch_size=4)
  with caplog.at_level(logging.INFO):
    model.fit(x, y, batch_size=4, epochs=1, callbacks=[logger], verbose=0)
  lines = [record.getMessage() for record in caplog.records
           if record.getMessage().startswith('Step ')]
  # Steps 3 and 6 of 7.
  assert [line.split(':')[0] for line in lines] == ['Step 3/7', 'Step 6/7']
  assert all('images/s' in line and 'ETA' in line for line in lines)


def test_learning_rate_logger_adds_the_rate_to_epoch_logs():
  model = _tiny_model()
  history = model.fit(np.zeros((4, 3), np.float32), np.zeros((4,), np.int64),
                      epochs=2, verbose=0,
                      callbacks=[progress.LearningRateLogger()])
  np.testing.assert_allclose(history.history['learning_rate'], [0.1, 0.1])


def test_progress_bar_only_on_a_terminal(monkeypatch):
  monkeypatch.setattr('sys.stdout.isatty', lambda: False)
  assert progress.fit_verbosity() == 2
  monkeypatch.setattr('sys.stdout.isatty', lambda: True)
  assert progress.fit_verbosity() == 1
