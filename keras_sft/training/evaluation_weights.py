"""The weights a run evaluates, keeps as best and exports.

With `ema_momentum` set they are the optimizer's moving averages of the
weights (EMA), else the weights themselves; with `precise_bn_batches` > 0
their BatchNormalization statistics are re-estimated for them
(`keras_sft.models.precise_bn`) first. Keras' EMA averages trainable
variables only, so without re-estimation EMA weights would be evaluated with the raw
weights' statistics.

`EvaluationWeights` puts them in place for each validation inside `fit`
(`on_test_begin`) and puts the training state back at the end of the epoch,
after `checkpoints.BestWeightsCallback` saved them (it must come before
this callback in the list) and before `checkpoints.BackupCallback` (after
it), so backups hold the state training goes on from and `best.weights.h5`
holds exactly the weights whose val_accuracy was logged.

Keras' `fit` ends by overwriting the model's weights with the EMA
(`finalize_variable_values`); `EvaluationWeights` puts the training weights
back when `fit` returns, so after `fit` the model always holds the state
training goes on from, on every worker, without re-reading a backup.
"""

import numpy as np

import keras

from keras_sft.models import precise_bn


def use(model, ema, statistics_batches=None, strategy=None):
  """Puts the evaluation weights into `model` (see the module docstring).

  Args:
    model: A compiled model holding the training state.
    ema: Whether the optimizer keeps an EMA of the weights to use.
    statistics_batches: None, or a finite dataset of training batches to
      re-estimate the BN statistics on.
    strategy: The model's `tf.distribute` strategy (None: the current one).
  """
  if ema:
    model.optimizer.finalize_variable_values(model.trainable_weights)
  if statistics_batches is not None:
    precise_bn.reestimate(model, statistics_batches, strategy)


class EvaluationWeights(keras.callbacks.Callback):
  """Validates `fit`'s epochs on the evaluation weights; see module doc.

  Args:
    ema: Whether the optimizer keeps an EMA of the weights.
    statistics_batches: A function returning a finite dataset of training
      batches for precise BN, or None (off).
    strategy: The model's `tf.distribute` strategy.
  """

  def __init__(self, ema, statistics_batches=None, strategy=None):
    super().__init__()
    self.ema = ema
    self.statistics_batches = statistics_batches
    self.strategy = strategy
    self._training_state = None
    self._trainable_after_epoch = None

  @property
  def active(self):
    return self.ema or self.statistics_batches is not None

  def on_test_begin(self, logs=None):
    if not self.active:
      return
    self._training_state = [np.array(variable) for variable in
                            self.model.variables]
    use(self.model, self.ema,
        self.statistics_batches() if self.statistics_batches else None,
        self.strategy)

  def on_epoch_end(self, epoch, logs=None):
    if self._training_state is not None:
      for variable, value in zip(self.model.variables, self._training_state):
        variable.assign(value)
      self._training_state = None
    if self.ema:
      # What fit's final EMA swap overwrites; put back in on_train_end.
      self._trainable_after_epoch = [
          np.array(variable) for variable in self.model.trainable_variables]

  def on_train_end(self, logs=None):
    if self._trainable_after_epoch is not None:
      for variable, value in zip(self.model.trainable_variables,
                                 self._trainable_after_epoch):
        variable.assign(value)
      self._trainable_after_epoch = None
