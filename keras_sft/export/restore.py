"""A run's trained model, rebuilt from its workdir for export.

`restore_run_model(workdir, checkpoint)` builds the model as training built
it (`recipe.build_model` from the run's `config.json`) and loads the chosen
checkpoint's weights, with the weights the run evaluates put in.
"""

import logging
import os

import keras
import ml_collections

from keras_sft import errors
from keras_sft import workdir as workdir_lib
from keras_sft.data import pipeline
from keras_sft.training import checkpoints
from keras_sft.training import evaluation_weights
from keras_sft.training import recipe

# Which backup of a run `restore_run_model` loads.
CHECKPOINTS = ('best', 'last')


def class_names_of_run(run):
  """Class names of the run in the `workdir.Workdir` `run`.

  Read from its `dataset.json` (written by training); for runs without one,
  from the tfds dataset info (which needs the prepared data).
  """
  if os.path.exists(run.dataset_file):
    return list(workdir_lib.read_json(run.dataset_file)['class_names'])
  config = run.read_config()
  builder = pipeline.get_builder(config['dataset'],
                                       data_dir=config['data_dir'])
  return list(pipeline.class_names(builder))


def restore_run_model(workdir, checkpoint='best', precision=None):
  """Rebuilds the model of the run in `workdir` with its trained weights.

  The model is built by `recipe.build_model` from the run's `config.json`,
  as training built it (trainable set, BN policy, EMA slots, dtype policy).

  Args:
    workdir: A run directory (`config.json`, `checkpoints/`).
    checkpoint: 'best' (`checkpoints/best.weights.h5`: the weights whose
      val_accuracy was the highest, EMA and BN statistics as evaluated; the
      last backup when the run has none) or 'last' (the newest backup that
      verifies, as a resumed run takes it, with
      the weights the run evaluates put in: the EMA if on, unless the run's
      final evaluation chose the raw weights (`exported_weights` in
      metrics.json), and BN statistics re-estimated on the run's training
      data if `precise_bn_batches`).
    precision: None (the run's `config.precision`), or another
      `config.precision` to build the model with, e.g. 'float32' for a
      run trained in mixed precision (its weights are float32 either way).

  Returns:
    `(model, config, class_names, weights_path)`; `config` is a ConfigDict.
  """
  errors.check_choice('checkpoint', checkpoint, CHECKPOINTS)
  run = workdir_lib.Workdir(workdir)
  config = ml_collections.ConfigDict(run.read_config())
  if precision is not None:
    config.precision = precision
  class_names = class_names_of_run(run)
  best = os.path.join(run.checkpoints, checkpoints.BEST_WEIGHTS)
  model = recipe.build_model(config, len(class_names), pretrained=False)
  if checkpoint == 'best' and os.path.exists(best):
    path = best
    try:
      checkpoints.load_weights(model, path)
    except errors.WorkdirError as error:
      raise errors.WorkdirError(
          f'{error} Export the newest backup instead with --checkpoint=last.'
      ) from error
  else:
    checkpointer = checkpoints.Checkpointer(run.checkpoints)
    if checkpointer.latest() is None:
      raise errors.PathNotFoundError(
          f'No backup in {run.checkpoints} to export: the run has not '
          'written one yet.')
    # The newest backup that verifies, as a resumed run takes.
    path = checkpointer.backup_path(checkpointer.restore(model))
  logging.info('Restored %s.', path)
  if path != best:
    statistics_batches = None
    if config.precise_bn_batches:
      # The batches training re-estimated on: tf.data's seeded shuffle
      # also depends on the global seed, which train._start sets.
      keras.utils.set_random_seed(config.seed)
      statistics_batches = pipeline.from_config(config).train(
          start_step=0).take(config.precise_bn_batches)
    ema = config.ema_momentum is not None
    if ema and os.path.exists(run.metrics_file):
      ema = workdir_lib.read_json(run.metrics_file).get(
          'exported_weights', 'ema') == 'ema'
    evaluation_weights.use(model, ema=ema,
                           statistics_batches=statistics_batches)
  return model, config, class_names, path
