"""`train_and_evaluate(config, workdir)`: one fine-tuning run, resumable.

A run is four steps, each a function below:

1. `_start`: check every config key, create the strategy, load and check
   the data, then claim the workdir (so a failed start leaves no claim),
   and derive the step counts and learning rate (`recipe.make_plan`).
2. `_build`: the model, optimizer and compiled state (`recipe.build_model`)
   inside the strategy scope, then the newest backup, if any.
3. `_fit_to_end`: `fit` from the restored step to the last one, with
   backups, TensorBoard, CSV log, progress lines and a stop on divergence; an
   interrupted epoch is finished first, on its remaining batches.
4. `_finish`: evaluate, fit the temperature on the calibration split (if
   `calibration_split`), write the report and `metrics.json`, export the
   next SavedModel version to `<workdir>/export/`.

Rerunning the same command continues where the last run stopped, to the
same step. `evaluate(config, workdir)` runs steps 1, 2 and 4. With
`semi_supervised='self_training'` a run is a teacher run, pseudo-labels and
a student run, each resumable (`keras_sft.training.self_training`).
"""

import contextlib
import dataclasses
import logging
import os

import keras
import numpy as np
import tensorflow as tf

from keras_sft.data import balance
from keras_sft.data import batch_augment
from keras_sft.data import folders
from keras_sft.data import pipeline
from keras_sft import errors
from keras_sft.export import formats
from keras_sft.export import restore
from keras_sft.export import saved_model
from keras_sft import files
from keras_sft.models import backbones
from keras_sft.models import classifier
from keras_sft.models import losses
from keras_sft.models import precise_bn
from keras_sft.training import calibration
from keras_sft.training import callbacks
from keras_sft.training import checkpoints
from keras_sft.training import distribution
from keras_sft.training import evaluation
from keras_sft.training import evaluation_weights
from keras_sft.training import optimizers
from keras_sft.training import precision
from keras_sft.training import progress
from keras_sft.training import recipe
from keras_sft.training import self_training
from keras_sft import workdir as workdir_lib


def _check_loop_config(config):
  errors.check_positive('num_epochs', config.num_epochs)
  # numpy's limits, which keras.utils.set_random_seed enforces.
  errors.check_integer('seed', config.seed, 0)
  errors.check_at_most('seed', config.seed, 2**32 - 1,
                       'are refused by numpy, which Keras seeds')
  errors.check_positive('steps_per_epoch', config.steps_per_epoch,
                        optional=True)
  errors.check_positive('eval_every_epochs', config.eval_every_epochs)
  errors.check_positive('eval_steps', config.eval_steps, optional=True)
  errors.check_positive('steps_per_execution', config.steps_per_execution)
  errors.check_positive('log_every_steps', config.log_every_steps)
  if config.steps_per_epoch is not None:
    _check_execution_divides('steps_per_epoch', config.steps_per_epoch,
                             config.steps_per_execution)
  if config.eval_steps is not None:
    _check_execution_divides('eval_steps', config.eval_steps,
                             config.steps_per_execution)


def _check_execution_divides(name, steps, steps_per_execution):
  """Keras runs whole executions of `steps_per_execution` steps.

  On an endless training stream the last execution of an epoch would run
  past its end (k=3 on 4 steps per epoch runs 6), so k must divide the
  steps of every `fit` and `evaluate`.
  """
  if steps % steps_per_execution:
    raise errors.ConfigError(
        f'steps_per_execution must divide {name}: Keras runs whole '
        f'executions, so {name}={steps} would run '
        f'{-(-steps // steps_per_execution) * steps_per_execution} steps. '
        f'Received: {name}={steps}, '
        f'steps_per_execution={steps_per_execution}. Use a divisor of '
        f'{steps}.')


# Each module checks the keys whose values it owns. The loop's keys first:
# other checks compare their keys with num_epochs (head_only_epochs), whose
# own error must come first.
_CHECKS = (
    _check_loop_config,
    pipeline.check_config,
    balance.check_config,
    backbones.check_config,
    classifier.check_config,
    losses.check_config,
    batch_augment.check_config,
    optimizers.check_config,
    precision.check_config,
    precise_bn.check_config,
    distribution.check_config,
    checkpoints.check_config,
    saved_model.check_config,
    formats.check_config,
    calibration.check_config,
    self_training.check_config,
)


def check_config(config):
  """Checks every key; raises `errors.ConfigError`; builds and reads nothing.

  Args:
    config: A ConfigDict with the keys of `keras_sft/default_config.py`.
  """
  for check in _CHECKS:
    check(config)


@dataclasses.dataclass
class _Run:
  """What the steps of a run share."""
  config: object
  workdir: workdir_lib.Workdir
  strategy: tf.distribute.Strategy
  chief: bool
  data: pipeline.Data
  plan: recipe.Plan
  checkpointer: checkpoints.Checkpointer
  # Held for the run's life on the chief (workdir_lib.Lock).
  lock: object = dataclasses.field(default_factory=contextlib.nullcontext)
  # Callbacks of the caller (train_and_evaluate's `callbacks`).
  extra_callbacks: tuple = ()
  # With calibration_split: `(batches, num_examples)` of that split.
  calibration: object = None
  # More entries of metrics.json (self-training's record).
  extra_metrics: dict = dataclasses.field(default_factory=dict)
  # None, or a finished run whose network weights a new run starts from
  # (self-training's student from its teacher).
  initial_network: str = None


@contextlib.contextmanager
def _log_to(run):
  """Appends the log to <workdir>/train.log on the chief, for the run."""
  if not run.chief:
    yield
    return
  handler = logging.FileHandler(run.workdir.log_file)
  handler.setFormatter(
      logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
  logging.getLogger().addHandler(handler)
  logging.getLogger().setLevel(logging.INFO)
  try:
    yield
  finally:
    logging.getLogger().removeHandler(handler)
    handler.close()


def _start(config, workdir, pseudo_labels=None):
  """Checks config and data, creates the strategy, claims the workdir.

  `pseudo_labels`: None, or a self-training student's pseudo-label file.
  """
  check_config(config)
  workdir = workdir_lib.Workdir(workdir)
  strategy = distribution.create_strategy(
      config.distribution,
      startup_timeout_seconds=config.startup_timeout_seconds,
      collective_timeout_seconds=config.collective_timeout_seconds)
  distribution.check_global_batch_size(config.global_batch_size, strategy)
  classifier.check_micro_batches(config.global_batch_size,
                                 config.gradient_accumulation_steps,
                                 strategy.num_replicas_in_sync)
  chief = distribution.is_chief(strategy)
  # A weights file of another model, or ImageNet weights offline, are
  # refused before the claim too. Before the seed is set: building the
  # backbone draws random numbers.
  backbones.check_weights_fit(config.model, config.image_size, config.weights)
  keras.utils.set_random_seed(config.seed)
  labels = pseudo_labels and self_training.read(pseudo_labels)
  data = pipeline.from_config(config, labels)
  calibration_data = None
  if config.calibration_split is not None:
    # Read (a folder's files decoded) now, on every worker as the other
    # splits: a missing split fails before training, not after it. Only the
    # chief fits the temperature.
    calibration_data = pipeline.split_dataset(
        config, config.calibration_split, data.info.class_names,
        held_out_from=data.info.files)
  _check_execution_divides(
      'steps_per_epoch',
      recipe.steps_per_epoch(config, data.info.num_train_examples),
      config.steps_per_execution)
  # Claimed only now: a start that fails on its config, data or weights
  # leaves the workdir free for the corrected command. The chief holds the
  # workdir's lock for the run's life; the other workers write nothing.
  lock = contextlib.nullcontext()
  if chief:
    os.makedirs(workdir.path, exist_ok=True)
    lock = workdir.lock()
  try:
    # The export reads the class names from dataset.json, so it needs no
    # dataset; a rerun on other data is refused.
    workdir.claim(config, write=chief,
                  dataset=_dataset_identity(config, data.info, labels),
                  legacy_files=_legacy_files(config))
    if chief:
      for path in workdir.remove_temporary_files():
        logging.info('Removed %s, left by a killed writer.', path)
  except BaseException:
    lock.__exit__(None, None, None)
    raise
  return _Run(config=config, workdir=workdir, strategy=strategy, chief=chief,
              data=data, plan=None,
              checkpointer=checkpoints.Checkpointer(
                  workdir.checkpoints, keep=config.keep_checkpoints),
              lock=lock, calibration=calibration_data)


def _dataset_identity(config, info, pseudo_labels=None):
  """What must not change between the starts of a run: see Workdir.claim."""
  identity = {'dataset': config.dataset, 'num_classes': info.num_classes,
              'class_names': list(info.class_names)}
  if pseudo_labels:  # The SHA-256 of the file the labels were read from.
    identity['pseudo_labels'] = pseudo_labels['sha256']
  if folders.is_folder_dataset(config.dataset):
    # The files read, not every file in the folder: a README or .DS_Store
    # added to it changes no batch.
    identity['files'] = workdir_lib.fingerprint_files(
        folders.folder_root(config.dataset), info.files)
  return identity


def _legacy_files(config):
  """What Workdir.claim checks a dataset.json of an older keras-sft with."""
  if not folders.is_folder_dataset(config.dataset):
    return None
  root = folders.folder_root(config.dataset)
  return lambda: workdir_lib.legacy_fingerprint_files(root)


# Fewer images per replica than this with trained BN: a warning.
_FEW_FOR_BN = 4


def _build(run):
  """The run's compiled model, restored from its newest backup if any."""
  # Logged here, where train.log is open, although known since _start.
  per_replica = (run.config.global_batch_size //
                 run.strategy.num_replicas_in_sync)
  logging.info('Strategy %s (%s): %d replica(s), %d images per replica per '
               'step.', type(run.strategy).__name__,
               distribution.task_name(run.strategy),
               run.strategy.num_replicas_in_sync, per_replica)
  if run.config.batch_norm == 'trained' and per_replica < _FEW_FOR_BN:
    # Measured: ResNet50 at 32 px from random weights, 2 images per step,
    # λ·R went from 0.9 to 396 in 2 steps (4 images: 0.9); BN's variance
    # of 2 values per channel in the 1×1 last stage makes huge gradients.
    logging.warning(
        'Trained BatchNorm normalizes each replica\'s %d image(s) by their '
        'own statistics: with fewer than %d the statistics are noise and '
        'training can diverge. Use a larger global_batch_size, fewer '
        'replicas, or batch_norm=frozen.', per_replica, _FEW_FOR_BN)
  info = run.data.info
  logging.info('Dataset %s: %d train / %d eval examples, %d classes.',
               run.config.dataset, info.num_train_examples,
               info.num_eval_examples, info.num_classes)
  balance.log_classes(info.train_class_counts,
                      run.data.train_options['class_weights'],
                      info.class_names, run.config.sampling)
  if info.num_unlabeled_examples:
    logging.info('Semi-supervised (%s): %d unlabelled images from %s%s.',
                 run.config.semi_supervised, info.num_unlabeled_examples,
                 run.config.unlabeled,
                 f', {run.config.fixmatch_mu * run.config.global_batch_size}'
                 ' per step' if run.config.semi_supervised == 'fixmatch'
                 else '')
  run.plan = recipe.make_plan(run.config, info.num_train_examples)
  if run.config.precise_bn_batches:
    precise_bn.log_if_capped(run.config.precise_bn_batches,
                             info.num_train_examples,
                             run.config.global_batch_size)
  with run.strategy.scope():
    model = recipe.build_model(run.config, info.num_classes, run.plan)
    run.checkpointer.restore(model)
    if run.initial_network and not checkpoints.trained_steps(model):
      _start_from(model, run.initial_network)
  decayed = classifier.decayed_variables(model.network)
  logging.info('L2 weight decay λ=%g on %d kernels (%d parameters).',
               run.config.weight_decay, len(decayed),
               sum(int(np.prod(v.shape)) for v in decayed))
  return model


def _start_from(model, workdir):
  """Puts the network weights of the finished run in `workdir` (those its
  export serves: EMA or raw as it evaluated, BN statistics included) into
  `model`, before its first step (a backup taken later has them)."""
  source, _, _, _ = restore.restore_run_model(workdir)
  values = [weight.numpy() for weight in source.network.weights]
  targets = model.network.weights
  if [tuple(v.shape) for v in values] != [tuple(t.shape) for t in targets]:
    raise errors.WorkdirError(
        f'The run in {workdir} has another network than this run; it cannot '
        'start from its weights. Delete it and rerun: it is trained again.')
  for target, value in zip(targets, values):
    target.assign(value)
  logging.info('Started from the network weights of the run in %s.',
               workdir)


def _statistics_batches(run):
  """Training batches for precise BN (None: off), the same on every call."""
  if not run.config.precise_bn_batches:
    return None
  # The first batches of the stream: deterministic, whatever the position of
  # a resumed run.
  # Labelled batches only (with unlabelled images too, training BN saw
  # both: models/fixmatch.py).
  return run.data.train(start_step=0, labeled_only=True).take(
      precise_bn.batch_count(run.config.precise_bn_batches,
                             run.data.info.num_train_examples,
                             run.config.global_batch_size))


def _fit(run, model, end_epoch, steps):
  """`fit` from the model's step to the end of epoch `end_epoch`."""
  step = checkpoints.trained_steps(model)
  fit_callbacks, divergence, preemption = callbacks.create(
      chief=run.chief, checkpointer=run.checkpointer, workdir=run.workdir,
      config=run.config, plan=run.plan, strategy=run.strategy,
      statistics_batches=((lambda: _statistics_batches(run))
                          if run.config.precise_bn_batches else None),
      extra=run.extra_callbacks)
  try:
    model.fit(run.data.train(start_step=step),
              initial_epoch=step // run.plan.steps_per_epoch,
              epochs=end_epoch, steps_per_epoch=steps,
              validation_data=run.data.eval,
              validation_steps=run.config.eval_steps,
              validation_freq=run.config.eval_every_epochs,
              callbacks=fit_callbacks,
              shuffle=False, verbose=progress.fit_verbosity())
  finally:
    preemption.uninstall()
  if divergence.reason:
    raise errors.DivergedError(_diverged(run, divergence.reason))


def _diverged(run, reason):
  """The message of a run that diverged: what, where to look, what to do."""
  latest = run.checkpointer.latest()
  backup = (f'The last backup, {latest[0]} (step {latest[1]}), holds finite '
            'weights' if latest else 'No backup was written')
  return (f'Training diverged: {reason}; training stopped. {backup}. Lower '
          '--config.learning_rate or raise --config.warmup_epochs, in a new '
          'workdir.')


def _fit_to_end(run, model):
  """Trains to the run's last step; returns whether any step was taken."""
  step = checkpoints.trained_steps(model)
  steps_per_epoch, total_steps = (run.plan.steps_per_epoch,
                                  run.plan.total_steps)
  if step >= total_steps:
    logging.info('The run in %s already finished its %d steps.',
                 run.workdir.path, total_steps)
    return False
  done_in_epoch = step % steps_per_epoch
  if done_in_epoch % run.config.steps_per_execution:
    # Backups are written between executions, so only a backup from
    # elsewhere is off the grid; its remainder would be over-stepped.
    raise errors.WorkdirError(
        f'The backup in {run.workdir.checkpoints} is at step {step}, '
        f'{done_in_epoch} steps into an epoch: not a multiple of '
        f'steps_per_execution={run.config.steps_per_execution}, so the rest '
        'of the epoch cannot be run exactly. Resume it with the '
        'steps_per_execution that wrote it, or start over in a new '
        '--workdir.')
  if run.chief:
    run.workdir.truncate_history(epochs=step // steps_per_epoch)
  if done_in_epoch:
    # Finish the interrupted epoch on its remaining batches first.
    logging.info('Finishing epoch %d: %d of %d steps left.',
                 step // steps_per_epoch + 1, steps_per_epoch - done_in_epoch,
                 steps_per_epoch)
    # fit leaves the training state in the model (EvaluationWeights).
    _fit(run, model, step // steps_per_epoch + 1,
         steps_per_epoch - done_in_epoch)
  if checkpoints.trained_steps(model) < total_steps:
    _fit(run, model, run.config.num_epochs, steps_per_epoch)
  return True


def _use_weights(run, model, ema, training_state):
  """Puts the raw (`ema=False`) or EMA weights in, BN re-estimated.

  Starts from `training_state` (the model's variables after training):
  evaluating one choice changes the BN statistics the next one starts from.
  """
  for variable, value in zip(model.variables, training_state):
    variable.assign(value)
  evaluation_weights.use(model, ema, _statistics_batches(run), run.strategy)


def _evaluate(run, model, ema, training_state):
  """Evaluates the raw (`ema=False`) or EMA weights, BN re-estimated."""
  _use_weights(run, model, ema, training_state)
  step = checkpoints.trained_steps(model)
  weights = 'EMA' if ema else 'raw'
  bad = checkpoints.non_finite_variables(model)
  if bad:
    raise errors.DivergedError(_diverged(
        run, f'{len(bad)} {weights} variable(s) not finite at step {step}: '
        f'{bad[:3]}'))
  results = model.evaluate(run.data.eval, steps=run.config.eval_steps,
                           return_dict=True, verbose=progress.fit_verbosity())
  results = {key: float(value) for key, value in results.items()}
  non_finite = {key: value for key, value in results.items()
                if not np.isfinite(value)}
  if non_finite:
    # Finite weights can still give NaN outputs: never report or export it.
    raise errors.DivergedError(_diverged(
        run, f'the evaluation of the {weights} weights at step {step} gives '
        f'{non_finite}'))
  return results


def _evaluate_and_choose(run, model):
  """Measures the raw and (if on) EMA weights; leaves the better in `model`.

  Returns:
    The metrics dict: `eval` of the weights left in `model`, and with EMA
    also `eval_raw`, `eval_ema` and `exported_weights`.
  """
  training_state = [np.array(variable) for variable in model.variables]
  if run.config.ema_momentum is None:
    return {'eval': _evaluate(run, model, False, training_state)}
  metrics = {'eval_raw': _evaluate(run, model, False, training_state),
             'eval_ema': _evaluate(run, model, True, training_state)}
  chosen = 'ema'
  if metrics['eval_ema']['accuracy'] < metrics['eval_raw']['accuracy']:
    logging.warning(
        'The EMA weights evaluate worse than the raw weights (accuracy %.4f '
        'vs %.4f): reporting and exporting the raw weights. Lower '
        '--config.ema_momentum for a run this short.',
        metrics['eval_ema']['accuracy'], metrics['eval_raw']['accuracy'])
    chosen = 'raw'
    _use_weights(run, model, False, training_state)
  metrics['exported_weights'] = chosen
  metrics['eval'] = metrics[f'eval_{chosen}']
  return metrics


def _finish(run, model, export):
  """Evaluates; on the chief writes the report, metrics and an export."""
  config = run.config
  step = checkpoints.trained_steps(model)
  metrics = {'step': step, 'total_steps': run.plan.total_steps}
  metrics.update(_evaluate_and_choose(run, model))
  metrics.update(run.extra_metrics)
  # Every worker logs it: equal sums show the replicas stayed in sync.
  logging.info('Weights checksum (%s) at step %d: %.12e',
               distribution.task_name(run.strategy), step,
               weights_checksum(model))
  if not run.chief:
    return metrics
  # Before metrics.json names their step: what `python -m keras_sft.export`
  # exports by default, then without reading the data again.
  checkpoints.write_final_weights(
      model, run.checkpointer.directory, step,
      metrics.get('exported_weights', 'raw'))
  record = _calibrate(run, model, step,
                      metrics.get('exported_weights', 'raw'))
  if record is not None:
    metrics['calibration'] = record
  metrics['report'] = evaluation.write_report(
      model, run.data.eval, run.data.info.class_names, run.workdir.path,
      steps=config.eval_steps, step=step,
      temperature=record['temperature'] if record else None)
  files.write_json(run.workdir.metrics_file, metrics)
  logging.info('Eval at step %d: %s', step, metrics['eval'])
  if export and config.export:
    _export(run, model)
  return metrics


def _calibrate(run, model, step, weights):
  """Fits T on the calibration split (None: off); writes calibration.json.

  For the weights left in `model` by the final evaluation: those
  final.weights.h5 holds and the export serves.
  """
  if run.calibration is None:
    calibration.remove_record(run.workdir.path)
    return None
  batches, _ = run.calibration
  labels, logits = evaluation.predict(model, batches)
  record = calibration.fit_record(logits, labels,
                                  run.config.calibration_split, step, weights)
  calibration.write_record(run.workdir.path, record)
  return record


def _export(run, model):
  """The next SavedModel version; a full disk is a `WorkdirError`."""
  what = 'the export (twice its size is kept free)'
  # The SavedModel holds each weight once.
  files.check_free_space(run.workdir.path,
                         2 * checkpoints.weights_size(model), what)
  # The weights left in `model` by the final evaluation (EMA or raw, BN
  # re-estimated), saved as final.weights.h5 just before: what
  # `python -m keras_sft.export` exports by default; metrics.json, written
  # before, holds their accuracy.
  source = restore.weights_source(
      run.workdir.path,
      os.path.join(run.checkpointer.directory, checkpoints.FINAL_WEIGHTS),
      checkpoints.trained_steps(model), config=run.config)
  try:
    saved_model.export_from_config(
        model, run.config, run.data.info.class_names, run.workdir.export,
        source=source,
        calibration=calibration.temperature_for_export(
            run.workdir.path, source['weights'], source['step'])[1])
  except (OSError, tf.errors.OpError) as error:
    if not files.is_disk_full(error):
      raise
    raise files.disk_full_error(run.workdir.export, what) from error


def train_and_evaluate(config, workdir, callbacks=()):
  """Trains, evaluates and exports; resumes the run found in `workdir`.

  Under multi-worker training every worker calls this with the same workdir,
  which must be on a file system they all see; only the chief writes to it.

  Args:
    config: A ConfigDict with the keys of `keras_sft/default_config.py`.
    workdir: Directory of the run.
    callbacks: More Keras callbacks for `fit`, called after the run's own
      at each epoch end (its history row and backup are written): e.g.
      `keras_sft.tune` reads each epoch's val_accuracy and stops a pruned
      trial by raising.

  Returns:
    The dict written to `<workdir>/metrics.json`.
  """
  if config.semi_supervised == self_training.NAME:
    return _self_train(config, workdir, callbacks)
  return _train_and_evaluate(config, workdir, callbacks)


def _train_and_evaluate(config, workdir, callbacks=(), pseudo_labels=None,
                        extra_metrics=None, initial_network=None):
  run = _start(config, workdir, pseudo_labels)
  run.extra_callbacks = tuple(callbacks)
  run.extra_metrics = dict(extra_metrics or {})
  run.initial_network = initial_network
  with run.lock, _log_to(run):
    model = _build(run)
    trained = _fit_to_end(run, model)
    # A rerun of a finished run exports only if no version was written yet.
    export = trained or not saved_model.list_versions(run.workdir.export)
    return _finish(run, model, export=export)


def _self_train(config, workdir, callbacks):
  """Teacher, then per round pseudo-labels and a student (the last is the
  run in `workdir`); each stage resumes or is skipped when finished."""
  check_config(config)
  stages = self_training.Stages(workdir)
  data = None
  if not os.path.exists(stages.pseudo_labels(1)):
    # Read and check the unlabelled images (and the labelled ones) now: a
    # missing, empty or corrupt folder fails before the teacher trains.
    data = pipeline.from_config(config)
  self_training.claim(config, stages)
  _teacher(config, stages)
  rounds = config.self_training_rounds
  for round_number in range(1, rounds + 1):
    path = stages.pseudo_labels(round_number)
    if self_training.is_chief_process():
      # Decided and written under one lock: no other process relabels
      # between the check and the file.
      with workdir_lib.Workdir(stages.directory).lock():
        if _needs_labels(config, stages, round_number):
          _pseudo_label(config, stages.teacher_of(round_number, rounds),
                        path, data if round_number == 1 else None)
    elif not os.path.exists(path):
      self_training.wait_for(path, config.startup_timeout_seconds)
    record = _self_training_record(stages, rounds, round_number)
    summary = record['rounds'][-1]
    self_training.log_round(round_number, summary)
    student = self_training.student_config(
        config, round_number, summary['num_labeled'],
        summary['num_pseudo_labeled'])
    last = round_number == rounds
    metrics = _train_and_evaluate(
        student, stages.student(round_number, rounds),
        callbacks if last else (), pseudo_labels=path,
        extra_metrics={self_training.NAME: record},
        initial_network=(stages.teacher_of(round_number, rounds)
                         if config.self_training_student_init == 'teacher'
                         else None))
  return metrics


def _teacher(config, stages):
  """The teacher's metrics: trained (or resumed) and evaluated, or, when it
  finished, read back after its claim checked the config and the labelled
  data again (it is not evaluated on every rerun)."""
  teacher_config = self_training.teacher_config(config)
  metrics = _finished_metrics(stages.teacher)
  if metrics is None:
    return _train_and_evaluate(teacher_config, stages.teacher)
  with _start(teacher_config, stages.teacher).lock:
    return metrics


def _finished_metrics(workdir):
  """The metrics.json of the finished run in `workdir` whose backups are
  there, else None (it is resumed or evaluated again)."""
  run = workdir_lib.Workdir(workdir)
  if not os.path.exists(run.metrics_file):
    return None
  metrics = files.read_json_object(run.metrics_file)
  finished = (metrics.get('step') == metrics.get('total_steps') and
              isinstance(metrics.get('eval'), dict) and
              'accuracy' in metrics['eval'] and
              checkpoints.Checkpointer(run.checkpoints).latest() is not None)
  return metrics if finished else None


def _self_training_record(stages, rounds, through=None):
  """metrics.json's `self_training`, from the stages' files: the teacher
  and rounds 1 to `through` (all when None), each earlier round with its
  student's top-1."""
  through = through or rounds
  teacher = files.read_json_object(
      workdir_lib.Workdir(stages.teacher).metrics_file)
  record = {'teacher': {'top1': teacher['eval']['accuracy'],
                        'step': teacher['step']}, 'rounds': []}
  for round_number in range(1, through + 1):
    record['rounds'].append(
        self_training.summary(stages.pseudo_labels(round_number)))
    if round_number < through:
      student = files.read_json_object(workdir_lib.Workdir(
          stages.student(round_number, rounds)).metrics_file)
      record['rounds'][-1]['student_top1'] = student['eval']['accuracy']
  return record


def _needs_labels(config, stages, round_number):
  """Whether round `round_number` labels (again): no file yet, or one made
  with another threshold or cap whose student has not started (once it
  has, its own claim refuses the changed keys)."""
  path = stages.pseudo_labels(round_number)
  if not os.path.exists(path):
    return True
  made = self_training.summary(path)
  cap = self_training.per_class_cap(
      made['num_unlabeled'], len(made['pseudo_labeled_per_class']),
      config.self_training_fraction)
  if (made['threshold'], made['cap_per_class']) == (
      config.self_training_threshold, cap):
    return False
  student = stages.student(round_number, config.self_training_rounds)
  if workdir_lib.Workdir(student).has_run():
    logging.warning(
        'Round %d keeps its labels, made with τ=%r and at most %d per class '
        '(the config asks for τ=%r and %d): its student in %s has started '
        'on them. Delete that student to label again.', round_number,
        made['threshold'], made['cap_per_class'],
        config.self_training_threshold, cap, student)
    return False
  logging.info('Labelling round %d again: its labels were made with τ=%r '
               'and at most %d per class, the config asks for τ=%r and %d.',
               round_number, made['threshold'], made['cap_per_class'],
               config.self_training_threshold, cap)
  return True


def _pseudo_label(config, teacher_workdir, path, data=None):
  """The teacher's predictions on the unlabelled images; writes `path`.

  `data`: the config's `pipeline.from_config`, if already read.
  """
  data = data or pipeline.from_config(config)
  model, _, class_names, _ = restore.restore_run_model(teacher_workdir)
  step = checkpoints.trained_steps(model)
  logging.info('Pseudo-labelling %d unlabelled images with the teacher in '
               '%s (step %d).', data.info.num_unlabeled_examples,
               teacher_workdir, step)
  images = data.unlabeled_examples.map(
      lambda image: (image, tf.constant(0, tf.int64)))
  _, logits = evaluation.predict(model, pipeline.make_eval_dataset(
      images, image_size=config.image_size,
      global_batch_size=config.global_batch_size, cache=False,
      resize_size=config.resize_size))
  probabilities = tf.nn.softmax(tf.constant(logits, tf.float64)).numpy()
  cap = self_training.per_class_cap(len(probabilities), len(class_names),
                                    config.self_training_fraction)
  chosen = self_training.select(probabilities,
                                config.self_training_threshold, cap)
  if not len(chosen[0]):
    raise errors.DataError(
        f'The teacher in {teacher_workdir} is not confident about any of '
        f'the {len(probabilities)} unlabelled images: none reached '
        f'self_training_threshold={config.self_training_threshold!r} (the '
        f'most confident prediction: {float(probabilities.max())!r}). Lower '
        '--config.self_training_threshold and rerun the same command: the '
        'trained teacher is kept.')
  self_training.write(path, self_training.record(
      probabilities, *chosen, class_names=class_names,
      threshold=config.self_training_threshold, cap=cap,
      teacher=teacher_workdir, teacher_step=step,
      num_labeled=data.info.num_train_examples,
      names=data.unlabeled_names))


def evaluate(config, workdir):
  """Evaluates the newest backup of the run in `workdir`; never trains.

  Writes the report files and `metrics.json` as a finished run does.

  Args:
    config: The run's config (a different one is refused, as in training).
    workdir: Directory of a run with at least one backup.

  Returns:
    The dict written to `<workdir>/metrics.json`.

  Raises:
    PathNotFoundError: `workdir` holds no run or no backup yet.
  """
  check_config(config)
  existing = workdir_lib.Workdir(workdir)
  existing.read_config()  # Raises when no run has claimed it.
  if checkpoints.Checkpointer(existing.checkpoints).latest() is None:
    raise errors.PathNotFoundError(
        f'workdir={workdir!r} holds no backup in {existing.checkpoints} to '
        'evaluate. Train first with --mode=train.')
  pseudo_labels, record = None, None
  if config.semi_supervised == self_training.NAME:
    # The last student is the run in `workdir`: its config and data.
    stages = self_training.Stages(workdir)
    pseudo_labels = stages.pseudo_labels(config.self_training_rounds)
    record = _self_training_record(stages, config.self_training_rounds)
    summary = record['rounds'][-1]
    config = self_training.student_config(
        config, config.self_training_rounds, summary['num_labeled'],
        summary['num_pseudo_labeled'])
  run = _start(config, workdir, pseudo_labels)
  if record is not None:
    run.extra_metrics = {self_training.NAME: record}
  with run.lock, _log_to(run):
    model = _build(run)
    logging.info('Evaluating the backup at step %d of %d.',
                 checkpoints.trained_steps(model), run.plan.total_steps)
    return _finish(run, model, export=False)


def weights_checksum(model):
  """Σ|w| over the model's weights, in float64: a cheap fingerprint."""
  return float(sum(np.abs(np.asarray(keras.ops.convert_to_numpy(weight),
                                     np.float64)).sum()
                   for weight in model.weights))
