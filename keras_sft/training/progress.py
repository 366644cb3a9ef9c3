"""What a person watching a run sees: progress lines and the learning rate.

On a terminal `fit` draws Keras' progress bar (with ETA); otherwise (a log
file, a cluster's job log) it prints one line per epoch, and `StepLogger`
adds a line every `every_steps` steps, so a long epoch (minutes at 224px on
a CPU) still shows that it moves and when it will end.
"""

import logging
import sys
import time

import keras

from keras_sft.training import checkpoints


def fit_verbosity():
  """`verbose` for `fit`/`evaluate`: 1 (progress bar) on a terminal, else 2."""
  return 1 if sys.stdout.isatty() else 2


class StepLogger(keras.callbacks.Callback):
  """Logs step, loss, images/s and the ETA every `every_steps` steps.

  Args:
    every_steps: Steps between lines.
    total_steps: Steps of the whole run (for the ETA).
    global_batch_size: Images per step (for images/s).
  """

  def __init__(self, every_steps, total_steps, global_batch_size):
    super().__init__()
    self.every_steps = every_steps
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self._last = None

  def on_train_begin(self, logs=None):
    self._last = (checkpoints.trained_steps(self.model), time.monotonic())

  def on_train_batch_end(self, batch, logs=None):
    step = checkpoints.trained_steps(self.model)
    last_step, last_time = self._last
    if step - last_step < self.every_steps:
      return
    now = time.monotonic()
    seconds_per_step = (now - last_time) / (step - last_step)
    remaining = (self.total_steps - step) * seconds_per_step
    loss = (logs or {}).get('loss')
    logging.info(
        'Step %d/%d: loss %s, %.1f images/s, ETA %s.', step, self.total_steps,
        'n/a' if loss is None else f'{float(loss):.4f}',
        self.global_batch_size / seconds_per_step,
        time.strftime('%H:%M:%S', time.gmtime(remaining)) if remaining < 86400
        else f'{remaining / 86400:.1f} days')
    self._last = (step, now)


class LearningRateLogger(keras.callbacks.Callback):
  """Adds the optimizer's current learning rate to the epoch logs."""

  def on_epoch_end(self, epoch, logs=None):
    if logs is not None:
      logs['learning_rate'] = float(
          keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
