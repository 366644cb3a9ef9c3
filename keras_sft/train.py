"""`train_and_evaluate(config, workdir)`: one fine-tuning run, resumable.

Order: check the config → claim the workdir → strategy → datasets → model and
optimizer inside the strategy scope → resume from the newest backup → `fit`
with backups, TensorBoard, CSV log and stop-on-NaN → evaluate →
`metrics.json` → SavedModel export to `<workdir>/export/<next version>/`.
Rerunning the same command on the same workdir continues where the last run
stopped, to the same optimizer step. The evaluation also writes the report of
`keras_sft.evaluation` into the workdir; `evaluate(config, workdir)` only
evaluates the newest backup.
"""

import contextlib
import logging
import os
import time

import keras
import numpy as np
import tensorflow as tf

from keras_sft import checkpointing
from keras_sft import classifier
from keras_sft import distribution
from keras_sft import evaluation
from keras_sft import export
from keras_sft import input_pipeline
from keras_sft import losses
from keras_sft import models
from keras_sft import optimizers
from keras_sft import precision
from keras_sft import recipe
from keras_sft import workdir as workdir_lib


def validate_config(config):
  """Raises ValueError naming the first bad value; cheap, builds nothing."""
  positive = ('image_size', 'global_batch_size', 'num_epochs',
              'learning_rate_batch_size', 'shuffle_buffer_size',
              'checkpoint_every_steps', 'keep_checkpoints',
              'eval_every_epochs', 'steps_per_execution', 'export_top_k')
  for key in positive:
    if not config[key] > 0:
      raise ValueError(f'config.{key} must be positive. Received: '
                       f'{key}={config[key]!r}')
  for key in ('steps_per_epoch', 'eval_steps'):
    if config[key] is not None and config[key] <= 0:
      raise ValueError(f'config.{key} must be positive or None. Received: '
                       f'{key}={config[key]!r}')
  for key in ('learning_rate', 'weight_decay', 'warmup_epochs',
              'adamw_weight_decay', 'momentum', 'dropout_rate'):
    if config[key] < 0:
      raise ValueError(f'config.{key} must be >= 0. Received: '
                       f'{key}={config[key]!r}')
  for key in ('startup_timeout_seconds', 'collective_timeout_seconds'):
    if config[key] is not None and config[key] <= 0:
      raise ValueError(f'config.{key} must be positive or None. Received: '
                       f'{key}={config[key]!r}')
  _parse_jit_compile(config.jit_compile)
  if config.distribution not in distribution.STRATEGIES:
    raise ValueError(f'Unknown distribution: distribution='
                     f'{config.distribution!r}. Expected one of '
                     f'{distribution.STRATEGIES}.')
  if config.optimizer not in ('sgd', 'adamw'):
    raise ValueError(f'Unknown optimizer: optimizer={config.optimizer!r}. '
                     'Expected "sgd" or "adamw".')
  if not 0 <= config.validation_fraction < 1:
    raise ValueError('config.validation_fraction must be in [0, 1). '
                     'Received: validation_fraction='
                     f'{config.validation_fraction!r}')
  models.resolve_weights(config.weights)
  recipe.validate_config(config)


class _LearningRateLogger(keras.callbacks.Callback):
  """Adds the optimizer's current learning rate to the epoch logs."""

  def on_epoch_end(self, epoch, logs=None):
    if logs is not None:
      logs['learning_rate'] = float(
          keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


def resolve_jit_compile(setting):
  """`jit_compile` for `model.compile`: XLA per replica on GPUs and TPUs.

  'auto' is True where an accelerator is present and False on CPUs, where XLA
  ran ~3x slower here. Unlike Keras' own 'auto', it stays on under a
  `tf.distribute` strategy: each replica's step is compiled.
  """
  setting = _parse_jit_compile(setting)
  if setting == 'auto':
    return bool(tf.config.list_logical_devices('GPU') or
                tf.config.list_logical_devices('TPU'))
  return setting


def _parse_jit_compile(setting):
  # Looks at no device: TF must not initialize before a multi-worker strategy.
  text = str(setting).lower()
  if text == 'auto':
    return 'auto'
  if text in ('true', 'false'):
    return text == 'true'
  raise ValueError("config.jit_compile must be 'auto', True or False. "
                   f'Received: jit_compile={setting!r}')


@contextlib.contextmanager
def _log_to(workdir, chief):
  """Appends the log to <workdir>/train.log on the chief, for the run."""
  if not chief:
    yield
    return
  handler = logging.FileHandler(os.path.join(workdir, 'train.log'))
  handler.setFormatter(
      logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
  logging.getLogger().addHandler(handler)
  logging.getLogger().setLevel(logging.INFO)
  try:
    yield
  finally:
    logging.getLogger().removeHandler(handler)
    handler.close()


def _start(config, workdir):
  """Checks the config, creates the strategy, claims the workdir."""
  validate_config(config)
  strategy = distribution.create_strategy(
      config.distribution,
      startup_timeout_seconds=config.startup_timeout_seconds,
      collective_timeout_seconds=config.collective_timeout_seconds)
  chief = distribution.is_chief(strategy)
  workdir_lib.prepare(workdir, config, write=chief)
  return strategy, chief


def train_and_evaluate(config, workdir):
  """Trains, evaluates and exports; resumes the run found in `workdir`.

  Under multi-worker training every worker calls this with the same workdir,
  which must be on a file system they all see; only the chief writes to it.

  Args:
    config: A ConfigDict with the keys of `configs/default.py`.
    workdir: Directory of the run.

  Returns:
    The dict written to `<workdir>/metrics.json`.
  """
  strategy, chief = _start(config, workdir)
  with _log_to(workdir, chief):
    return _train_and_evaluate(config, workdir, strategy, chief)


def evaluate(config, workdir):
  """Evaluates the newest backup of the run in `workdir`; never trains.

  Writes the report files and `metrics.json` as a finished run does.

  Args:
    config: The run's config (a different one is refused, as in training).
    workdir: Directory of a run with at least one backup.

  Returns:
    The dict written to `<workdir>/metrics.json`.

  Raises:
    FileNotFoundError: `workdir` holds no run or no backup yet.
  """
  validate_config(config)
  if not os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
    raise FileNotFoundError(
        f'workdir={workdir!r} holds no run to evaluate (no '
        f'{workdir_lib.CONFIG_FILE}). Train first with --mode=train.')
  if checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints')).latest(
  ) is None:
    raise FileNotFoundError(
        f'workdir={workdir!r} holds no backup in {workdir}/checkpoints to '
        'evaluate. Train first with --mode=train.')
  strategy, chief = _start(config, workdir)
  with _log_to(workdir, chief):
    return _train_and_evaluate(config, workdir, strategy, chief,
                               evaluate_only=True)


def _train_and_evaluate(config, workdir, strategy, chief, evaluate_only=False):
  distribution.check_global_batch_size(config.global_batch_size, strategy)
  keras.utils.set_random_seed(config.seed)

  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=config.keep_checkpoints)
  latest = checkpointer.latest()
  start_step = latest[1] if latest else 0

  def datasets(start):
    return input_pipeline.create_datasets(
        config.dataset, image_size=config.image_size,
        global_batch_size=config.global_batch_size,
        train_split=config.train_split, eval_split=config.eval_split,
        data_dir=config.data_dir, seed=config.seed,
        shuffle_buffer_size=config.shuffle_buffer_size, cache=config.cache,
        start_step=start, validation_fraction=config.validation_fraction,
        skip_corrupt_images=config.skip_corrupt_images,
        batch_augmentation=dict(
            mixup_alpha=config.mixup_alpha,
            cutmix_alpha=config.cutmix_alpha,
            randaugment_num_ops=config.randaugment_num_ops,
            randaugment_magnitude=config.randaugment_magnitude),
        resize_size=config.resize_size)

  train_data, eval_data, info = datasets(start_step)
  # The export reads the class names here, so it needs no dataset.
  if chief:
    workdir_lib.write_json(os.path.join(workdir, export.DATASET_FILE),
                {'dataset': config.dataset, 'num_classes': info.num_classes,
                 'class_names': list(info.class_names)})
  steps_per_epoch = (config.steps_per_epoch or
                     info.num_train_examples // config.global_batch_size)
  total_steps = config.num_epochs * steps_per_epoch
  warmup_steps = min(int(round(config.warmup_epochs * steps_per_epoch)),
                     total_steps - 1)
  peak_learning_rate = optimizers.scaled_learning_rate(
      config.learning_rate, config.global_batch_size,
      config.learning_rate_batch_size)
  logging.info(
      'Derived: %d steps/epoch x %d epochs = %d steps; warmup %d steps; peak '
      'learning rate %g (= %g x %d / %d).', steps_per_epoch,
      config.num_epochs, total_steps, warmup_steps, peak_learning_rate,
      config.learning_rate, config.global_batch_size,
      config.learning_rate_batch_size)

  head_only_steps = int(round(config.head_only_epochs * steps_per_epoch))
  logging.info('Recipe: batch_norm=%s, freeze_until=%s, head-only steps %d, '
               'backbone LR multiplier %g.', config.batch_norm,
               config.freeze_until, head_only_steps,
               config.backbone_learning_rate_multiplier)
  policy = precision.resolve_policy(config.precision)
  logging.info('Dtype policy: %s.', policy)
  # The policy applies to the layers built here; the global is restored after.
  with strategy.scope(), precision.global_policy(policy):
    model = models.create_model(
        info.num_classes, config.image_size, weights=config.weights,
        dropout_rate=config.dropout_rate, weight_decay=config.weight_decay,
        seed=config.seed, batch_norm=config.batch_norm,
        freeze_until_stage=config.freeze_until,
        backbone_multiplier=config.backbone_learning_rate_multiplier,
        head_only_steps=head_only_steps)
    schedule = recipe.create_schedule(config, peak_learning_rate,
                                      total_steps, warmup_steps)
    optimizer = optimizers.create_optimizer(
        config.optimizer, schedule, momentum=config.momentum,
        nesterov=config.nesterov,
        adamw_weight_decay=config.adamw_weight_decay,
        ema_momentum=config.ema_momentum)
    compile_model(model, optimizer,
                  jit_compile=resolve_jit_compile(config.jit_compile),
                  steps_per_execution=config.steps_per_execution,
                  label_smoothing=config.label_smoothing)
    build(model, config.image_size)
    step = checkpointer.restore(model)
  decayed = classifier.decayed_variables(model.network)
  logging.info('L2 weight decay λ=%g on %d kernels (%d parameters).',
               config.weight_decay, len(decayed),
               sum(int(np.prod(v.shape)) for v in decayed))

  callbacks = [keras.callbacks.TerminateOnNaN()]
  if chief:  # The other workers of a multi-worker run write nothing.
    callbacks += [
        checkpointing.BackupCallback(checkpointer,
                                     config.checkpoint_every_steps),
        checkpointing.BestWeightsCallback(checkpointer.directory),
        _LearningRateLogger(),
        keras.callbacks.CSVLogger(os.path.join(workdir, 'history.csv'),
                                  append=True),
        keras.callbacks.TensorBoard(os.path.join(workdir, 'tensorboard')),
    ]

  def fit(train, start, end_epoch, steps):
    epoch = start // steps_per_epoch
    model.fit(train, initial_epoch=epoch, epochs=end_epoch,
              steps_per_epoch=steps, validation_data=eval_data,
              validation_steps=config.eval_steps,
              validation_freq=config.eval_every_epochs, callbacks=callbacks,
              shuffle=False, verbose=2)
    _check_finite(model, workdir)

  trained = not evaluate_only and step < total_steps
  if evaluate_only:
    logging.info('Evaluating the backup at step %d of %d.', step, total_steps)
  elif step < total_steps:
    done_in_epoch = step % steps_per_epoch
    if done_in_epoch:
      # Finish the interrupted epoch on its remaining batches first.
      logging.info('Finishing epoch %d: %d of %d steps left.',
                   step // steps_per_epoch + 1,
                   steps_per_epoch - done_in_epoch, steps_per_epoch)
      fit(train_data, step, step // steps_per_epoch + 1,
          steps_per_epoch - done_in_epoch)
      step = int(model.optimizer.iterations.numpy())
      if config.ema_momentum is not None:
        # fit swapped the EMA weights in; go on from the raw ones, which the
        # chief's epoch-end backup holds (the other workers wait for it).
        _wait_for_backup(checkpointer, step, config.collective_timeout_seconds)
        checkpointer.restore(model)
      train_data, _, _ = datasets(step)
    if step < total_steps:
      fit(train_data, step, config.num_epochs, steps_per_epoch)
  else:
    logging.info('The run in %s already finished its %d steps.', workdir,
                 total_steps)

  if config.ema_momentum is not None:
    # Evaluate and export the EMA weights. fit already swapped them in after
    # training; a restored backup holds the raw ones (idempotent otherwise).
    model.optimizer.finalize_variable_values(model.trainable_weights)
  # Every worker logs it: equal sums show the replicas stayed in sync.
  logging.info('Weights checksum (%s) at step %d: %.12e',
               distribution.task_name(strategy),
               int(model.optimizer.iterations.numpy()), weights_checksum(model))
  results = model.evaluate(eval_data, steps=config.eval_steps,
                           return_dict=True, verbose=2)
  metrics = {
      'step': int(model.optimizer.iterations.numpy()),
      'total_steps': total_steps,
      'eval': {key: float(value) for key, value in results.items()},
  }
  if not chief:
    return metrics
  metrics['report'] = evaluation.write_report(
      model, eval_data, info.class_names, workdir, steps=config.eval_steps,
      step=metrics['step'])
  workdir_lib.write_json(os.path.join(workdir, 'metrics.json'), metrics)
  logging.info('Eval at step %d: %s', metrics['step'], metrics['eval'])
  if evaluate_only:
    return metrics
  export_base = os.path.join(workdir, 'export')
  # A rerun of a finished run exports only if no version was written yet.
  if config.export and (trained or not export.list_versions(export_base)):
    export.export_version(model, export_base, config.image_size,
                          info.class_names, top_k=config.export_top_k)
  return metrics


def compile_model(model, optimizer, jit_compile=False, steps_per_execution=1,
                  label_smoothing=0.0):
  """Compiles with from-logits cross-entropy, top-1 and top-5 accuracy.

  The loss takes class ids or soft (MixUp/CutMix) labels; see
  `keras_sft.losses`.
  """
  model.compile(
      optimizer=optimizer,
      loss=losses.CrossEntropy(label_smoothing=label_smoothing),
      metrics=[
          keras.metrics.SparseCategoricalAccuracy(name='accuracy'),
          keras.metrics.SparseTopKCategoricalAccuracy(k=5, name='top5'),
      ],
      jit_compile=jit_compile,
      steps_per_execution=steps_per_execution)


def build(model, image_size):
  """Creates the model's variables (needed before restoring a backup)."""
  model(np.zeros((1, image_size, image_size, 3), np.float32), training=False)


def _wait_for_backup(checkpointer, step, timeout_seconds):
  """Waits until the newest backup is at `step` (written by the chief)."""
  deadline = time.monotonic() + (timeout_seconds or float('inf'))
  while (checkpointer.latest() or (None, -1))[1] < step:
    if time.monotonic() > deadline:
      raise TimeoutError(
          f'No backup of step {step} appeared in {checkpointer.directory} '
          f'within {timeout_seconds} s: is the chief alive?')
    time.sleep(0.5)


def weights_checksum(model):
  """Σ|w| over the model's weights, in float64: a cheap fingerprint."""
  return float(sum(np.abs(np.asarray(keras.ops.convert_to_numpy(weight),
                                     np.float64)).sum()
                   for weight in model.weights))


def _check_finite(model, workdir):
  if model.stop_training:
    raise FloatingPointError(
        'The loss became NaN or infinite at step '
        f'{int(model.optimizer.iterations.numpy())}; training stopped. The '
        f'last finite backup is in {workdir}/checkpoints. Lower '
        '--config.learning_rate or raise --config.warmup_epochs, in a new '
        'workdir.')


