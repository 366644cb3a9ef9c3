"""A run's trained model, rebuilt from its workdir for export.

`restore_run_model(workdir, checkpoint)` builds the model as training built
it (`recipe.build_model` from the run's `config.json`) and loads the chosen
checkpoint's weights, with the weights the run evaluates put in.
"""

import logging
import os

import keras
import ml_collections

from keras_sft.data import pipeline
from keras_sft import errors
from keras_sft import files
from keras_sft.models import precise_bn
from keras_sft.training import checkpoints
from keras_sft.training import evaluation_weights
from keras_sft.training import recipe
from keras_sft import workdir as workdir_lib

# Which backup of a run `restore_run_model` loads.
CHECKPOINTS = ('best', 'last')
# Which weights an export holds unless told otherwise, everywhere: those the
# run's final evaluation measured and its own export (`export/1`) holds, so
# a SavedModel and an ONNX file of one run are one classifier by default.
DEFAULT_CHECKPOINT = 'last'


def class_names_of_run(run):
  """Class names of the run in the `workdir.Workdir` `run`.

  Read from its `dataset.json` (written by training); for runs without one,
  from the tfds dataset info (which needs the prepared data).
  """
  if os.path.exists(run.dataset_file):
    return list(files.read_json(run.dataset_file)['class_names'])
  config = run.read_config()
  builder = pipeline.get_builder(config['dataset'],
                                 data_dir=config['data_dir'])
  return list(pipeline.class_names(builder))


def restore_run_model(workdir, checkpoint=DEFAULT_CHECKPOINT, precision=None):
  """Rebuilds the model of the run in `workdir` with its trained weights.

  The model is built by `recipe.build_model` from the run's `config.json`,
  as training built it (trainable set, BN policy, EMA slots, dtype policy).

  Args:
    workdir: A run directory (`config.json`, `checkpoints/`).
    checkpoint: 'last' (the default: the newest backup that verifies, as a
      resumed run takes it, with the weights the run evaluates put in: the
      EMA if on, unless the run's final evaluation chose the raw weights
      (`exported_weights` in metrics.json), and BN statistics re-estimated
      on the run's training data if `precise_bn_batches`; for a finished
      run, the weights of its own export) or 'best'
      (`checkpoints/best.weights.h5`: the weights whose val_accuracy was the
      highest, EMA and BN statistics as evaluated; the last backup when the
      run has none).
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
    final = os.path.join(run.checkpoints, checkpoints.FINAL_WEIGHTS)
    record = checkpoints.final_record(run.checkpoints)
    if record and record['step'] == checkpoints.trained_steps(model):
      # The final evaluation's weights of this step, BN statistics
      # included: no data needed to re-estimate them.
      try:
        checkpoints.load_weights(model, final)
        path = final
      except errors.WorkdirError as error:
        logging.warning('%s Re-deriving its weights from the backup.', error)
        checkpointer.restore(model)
  logging.info('Restored %s.', path)
  if path not in (best, os.path.join(run.checkpoints,
                                     checkpoints.FINAL_WEIGHTS)):
    statistics_batches = None
    if config.precise_bn_batches:
      # The batches training re-estimated on: tf.data's seeded shuffle
      # also depends on the global seed, which train._start sets.
      keras.utils.set_random_seed(config.seed)
      data = pipeline.from_config(config)
      precise_bn.log_if_capped(config.precise_bn_batches,
                               data.info.num_train_examples,
                               config.global_batch_size)
      statistics_batches = data.train(start_step=0, labeled_only=True).take(
          precise_bn.batch_count(config.precise_bn_batches,
                                 data.info.num_train_examples,
                                 config.global_batch_size))
    evaluation_weights.use(model, ema=_evaluates_ema(run, config),
                           statistics_batches=statistics_batches)
  return model, config, class_names, path


def _evaluates_ema(run, config):
  """Whether the run's evaluation weights are its EMA (else the raw ones)."""
  ema = config.ema_momentum is not None
  if ema and os.path.exists(run.metrics_file):
    ema = files.read_json(run.metrics_file).get(
        'exported_weights', 'ema') == 'ema'
  return ema


def weights_source(workdir, path, step, config=None):
  """Which weights of the run an export holds: its metadata's `source`.

  Args:
    workdir: The run directory.
    path: The weights file restored: `best.weights.h5` or a backup.
    step: The training step of those weights.
    config: The run's ConfigDict; default read from its `config.json`.

  Returns:
    A JSON-able dict: `workdir`, `checkpoint` ('best' or 'last'),
    `weights` (the file's name), `step`, `ema` (EMA or raw weights),
    `accuracy` (top-1 on the eval split, None if never measured for these
    weights) and `accuracy_from` (what measured it).
  """
  run = workdir_lib.Workdir(workdir)
  if config is None:
    config = ml_collections.ConfigDict(run.read_config())
  source = {'workdir': os.path.abspath(workdir),
            'weights': os.path.basename(path), 'step': int(step)}
  if os.path.basename(path) == checkpoints.BEST_WEIGHTS:
    record = checkpoints.best_record(run.checkpoints) or {}
    source.update(
        checkpoint='best', step=int(record.get('step', step)),
        ema=config.ema_momentum is not None, accuracy=record.get('value'),
        accuracy_from=f'{record.get("monitor", "val_accuracy")} of its '
        'epoch')
    return source
  metrics = (files.read_json(run.metrics_file)
             if os.path.exists(run.metrics_file) else {})
  measured = metrics.get('step') == step
  source.update(
      checkpoint='last', ema=_evaluates_ema(run, config),
      accuracy=metrics['eval']['accuracy'] if measured else None,
      accuracy_from='the final evaluation (metrics.json)' if measured
      else None,
      # The run exported these weights itself when its final evaluation
      # measured them and export was on.
      own_export=bool(measured and config.export))
  return source


def describe_source(source):
  """One line for the export command's output: which weights, and whether
  they are those of the run's own export."""
  accuracy = ('accuracy not measured' if source.get('accuracy') is None else
              f'accuracy {source["accuracy"]:.4f} ({source["accuracy_from"]})')
  weights = 'EMA' if source.get('ema') else 'raw'
  text = (f'checkpoint={source["checkpoint"]}: {source["weights"]}, step '
          f'{source["step"]}, {weights} weights, {accuracy}')
  if source['checkpoint'] == 'last':
    if source.get('own_export'):
      return text + "; the weights of the run's own export at that step"
    return text + ('; the newest backup: the run has not finished (or was '
                   'not exported) at that step')
  return (text + "; NOT the weights of the run's own export (its final "
          'weights: --checkpoint=last), a different classifier')
