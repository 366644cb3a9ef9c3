"""`tf.distribute` strategies by name, and checks of the global batch."""

import logging

import tensorflow as tf

STRATEGIES = ('default', 'one_device', 'mirrored')


def create_strategy(name):
  """Returns the `tf.distribute.Strategy` called `name`.

  Args:
    name: 'default' (no distribution), 'one_device' (the first GPU, else the
      CPU) or 'mirrored' (every local GPU, else the CPU devices).

  Raises:
    ValueError: an unknown name.
  """
  if name == 'default':
    return tf.distribute.get_strategy()
  if name == 'one_device':
    gpus = tf.config.list_logical_devices('GPU')
    return tf.distribute.OneDeviceStrategy(
        gpus[0].name if gpus else '/cpu:0')
  if name == 'mirrored':
    gpus = tf.config.list_logical_devices('GPU')
    devices = None if gpus else [
        device.name for device in tf.config.list_logical_devices('CPU')]
    return tf.distribute.MirroredStrategy(devices=devices)
  raise ValueError(f'Unknown distribution: distribution={name!r}. '
                   f'Expected one of {STRATEGIES}.')


def check_global_batch_size(global_batch_size, strategy):
  """Returns the per-replica batch, or raises if it would not be whole."""
  num_replicas = strategy.num_replicas_in_sync
  if global_batch_size <= 0 or global_batch_size % num_replicas:
    raise ValueError(
        f'global_batch_size={global_batch_size} must be a positive multiple '
        f'of the {num_replicas} replicas in sync, e.g. '
        f'--config.global_batch_size='
        f'{num_replicas * max(1, global_batch_size // num_replicas)}.')
  per_replica = global_batch_size // num_replicas
  logging.info('Strategy %s: %d replica(s), %d images per replica per step.',
               type(strategy).__name__, num_replicas, per_replica)
  return per_replica
