"""`tf.distribute` strategies by name, the chief, and checks of the batch.

| name | what |
|---|---|
| `auto` | TPU if this is a TPU VM (or $TPU_NAME is set); else TF_CONFIG with several tasks: `multi_worker_mirrored`; else several GPUs: `mirrored`; else `default` |
| `default` | no distribution: one device |
| `one_device` | the first GPU, else the CPU |
| `mirrored` | every GPU of this machine (the CPUs when there is none) |
| `multi_worker_mirrored` | every GPU of every machine in $TF_CONFIG |
| `tpu` | the TPU named by $TPU_NAME ('local' on a TPU VM) |
"""

import json
import logging
import os

import tensorflow as tf

from keras_sft import errors
from keras_sft.training import multi_worker

STRATEGIES = ('auto', 'default', 'one_device', 'mirrored',
              'multi_worker_mirrored', 'tpu')
# Device files of a TPU VM.
_TPU_DEVICE_FILES = ('/dev/accel0', '/dev/vfio/0')


def check_config(config):
  """Checks the distribution and compilation keys; looks at no device."""
  errors.check_choice('distribution', config.distribution, STRATEGIES)
  errors.check_positive('startup_timeout_seconds',
                        config.startup_timeout_seconds, optional=True)
  errors.check_positive('collective_timeout_seconds',
                        config.collective_timeout_seconds, optional=True)
  parse_jit_compile(config.jit_compile)


def parse_jit_compile(setting):
  """'auto', True or False from a config value (also the strings)."""
  # Looks at no device: TF must not initialize before a multi-worker strategy.
  text = str(setting).lower()
  if text == 'auto':
    return 'auto'
  if text in ('true', 'false'):
    return text == 'true'
  raise errors.ConfigError("jit_compile must be 'auto', True or False. "
                           f'Received: jit_compile={setting!r}')


def resolve_jit_compile(setting):
  """`jit_compile` for `model.compile`: XLA per replica on GPUs and TPUs.

  'auto' is True where an accelerator is present and False on CPUs, where XLA
  made the step slower (README "Performance"). Unlike Keras' own 'auto', it
  stays on under a `tf.distribute` strategy: each replica's step is
  compiled.
  """
  setting = parse_jit_compile(setting)
  if setting == 'auto':
    return bool(tf.config.list_logical_devices('GPU') or
                tf.config.list_logical_devices('TPU'))
  return setting


def read_tf_config(environ=None):
  """Returns the parsed, checked $TF_CONFIG, or None when it is unset.

  Raises:
    ValueError: TF_CONFIG is not JSON, lacks `cluster` or `task`, or its task
      is not in the cluster.
  """
  text = (os.environ if environ is None else environ).get('TF_CONFIG')
  if not text:
    return None
  try:
    tf_config = json.loads(text)
  except json.JSONDecodeError as error:
    raise errors.ConfigError(
        f'TF_CONFIG is not valid JSON ({error}): '
        f'TF_CONFIG={text!r}') from error
  cluster, task = tf_config.get('cluster'), tf_config.get('task')
  if not isinstance(cluster, dict) or not cluster:
    raise errors.ConfigError(
        'TF_CONFIG needs a "cluster" mapping job names to '
        f'host:port lists. Received: TF_CONFIG={text!r}')
  if not isinstance(task, dict) or 'type' not in task or 'index' not in task:
    raise errors.ConfigError(
        'TF_CONFIG needs a "task" with "type" and "index". '
        f'Received: TF_CONFIG={text!r}')
  hosts = cluster.get(task['type'])
  if not hosts:
    raise errors.ConfigError(
        f'TF_CONFIG task type {task["type"]!r} is not in its '
        f'cluster {sorted(cluster)}. Received: TF_CONFIG={text!r}')
  if not isinstance(task['index'], int) or not 0 <= task['index'] < len(hosts):
    raise errors.ConfigError(
        f'TF_CONFIG task index {task["index"]!r} is out of range for the '
        f'{len(hosts)} {task["type"]!r} host(s) {hosts}. Received: '
        f'TF_CONFIG={text!r}')
  return tf_config


def _cluster_hosts(tf_config):
  """Host:port of every task, in the order chief, then workers."""
  cluster = tf_config['cluster']
  return [host for job in ('chief', 'worker') for host in cluster.get(job, [])]


def _own_host(tf_config):
  task = tf_config['task']
  return tf_config['cluster'][task['type']][task['index']]


def resolve_auto():
  """The strategy name `auto` stands for on this machine."""
  if os.environ.get('TPU_NAME') or any(
      os.path.exists(path) for path in _TPU_DEVICE_FILES):
    return 'tpu'
  tf_config = read_tf_config()
  if tf_config and len(_cluster_hosts(tf_config)) > 1:
    return 'multi_worker_mirrored'
  if len(tf.config.list_physical_devices('GPU')) > 1:
    return 'mirrored'
  return 'default'


def create_strategy(name, startup_timeout_seconds=300,
                    collective_timeout_seconds=None):
  """Returns the `tf.distribute.Strategy` called `name` (see module doc).

  Args:
    name: One of `STRATEGIES`.
    startup_timeout_seconds: multi_worker_mirrored: how long to wait for every
      task in TF_CONFIG to start before failing (TensorFlow itself waits
      forever).
    collective_timeout_seconds: multi_worker_mirrored: a collective (one
      gradient all-reduce) that takes longer fails instead of hanging, e.g.
      when a peer died. None: no limit.

  Raises:
    ValueError: an unknown name, or a bad TF_CONFIG.
    TimeoutError: a peer did not start within `startup_timeout_seconds`.
  """
  errors.check_choice('distribution', name, STRATEGIES)
  if name == 'auto':
    name = resolve_auto()
    logging.info('distribution=auto chose %r.', name)
  if name == 'default':
    return tf.distribute.get_strategy()
  # One strategy per kind and process: runs that follow one another in a
  # process (self-training's teacher and students, tuning trials) share it.
  # A second MirroredStrategy starts its collective instance keys where the
  # first did, and TensorFlow's runtime then rejects an all-reduce whose key
  # a finished run used with another dtype ("Collective instance 104
  # expected type 2 ..."); a second multi-worker or TPU strategy cannot be
  # made at all once the first has configured the runtime.
  key = (name, startup_timeout_seconds, collective_timeout_seconds)
  if key not in _CREATED:
    _CREATED[key] = _create(name, startup_timeout_seconds,
                            collective_timeout_seconds)
  return _CREATED[key]


_CREATED = {}


def _create(name, startup_timeout_seconds, collective_timeout_seconds):
  if name == 'one_device':
    gpus = tf.config.list_logical_devices('GPU')
    return tf.distribute.OneDeviceStrategy(
        gpus[0].name if gpus else '/cpu:0')
  if name == 'mirrored':
    gpus = tf.config.list_logical_devices('GPU')
    devices = None if gpus else [
        device.name for device in tf.config.list_logical_devices('CPU')]
    return tf.distribute.MirroredStrategy(devices=devices)
  if name == 'multi_worker_mirrored':
    return _multi_worker_strategy(startup_timeout_seconds,
                                  collective_timeout_seconds)
  return _tpu_strategy()


def _multi_worker_strategy(startup_timeout_seconds,
                           collective_timeout_seconds):
  tf_config = read_tf_config()
  if tf_config is None:
    raise errors.ConfigError(
        'distribution=multi_worker_mirrored needs $TF_CONFIG naming every '
        'worker (see launch/multi_machine.sh).')
  multi_worker.wait_for_peers(_own_host(tf_config),
                              _cluster_hosts(tf_config),
                              startup_timeout_seconds)
  multi_worker.apply()
  options = tf.distribute.experimental.CommunicationOptions(
      timeout_seconds=collective_timeout_seconds)
  return tf.distribute.MultiWorkerMirroredStrategy(
      communication_options=options)


def _tpu_strategy():
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
      tpu=os.environ.get('TPU_NAME', 'local'))
  tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy):
  """Whether this process writes the run's files (backups, logs, export).

  The chief is the `chief` task if TF_CONFIG has one, else worker 0; every
  strategy of a single process is its own chief.
  """
  resolver = getattr(strategy, 'cluster_resolver', None)
  task_type = getattr(resolver, 'task_type', None)
  if not task_type or task_type == 'chief':
    return True
  return (task_type == 'worker' and resolver.task_id == 0 and
          'chief' not in resolver.cluster_spec().as_dict())


def task_name(strategy):
  """'worker 1', 'chief', ... or 'local' for a single process."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if not getattr(resolver, 'task_type', None):
    return 'local'
  return f'{resolver.task_type} {resolver.task_id}'


def check_global_batch_size(global_batch_size, strategy):
  """Returns the per-replica batch, or raises if it would not be whole."""
  num_replicas = strategy.num_replicas_in_sync
  if global_batch_size <= 0 or global_batch_size % num_replicas:
    raise errors.ConfigError(
        f'global_batch_size={global_batch_size} must be a positive multiple '
        f'of the {num_replicas} replicas in sync, e.g. '
        f'--config.global_batch_size='
        f'{num_replicas * max(1, global_batch_size // num_replicas)}.')
  return global_batch_size // num_replicas
