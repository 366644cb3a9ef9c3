"""Makes Keras 3 `model.fit` work under MultiWorkerMirroredStrategy.

keras-team/keras#20585 (open): with the TensorFlow backend, `fit` under
`MultiWorkerMirroredStrategy` fails twice before the first step:

1. `TensorFlowTrainer._maybe_symbolic_build` reduces the first distributed
   batch with `strategy.reduce("MEAN", batch, axis=None)`, which cannot
   convert a multi-worker `PerReplica` batch to a tensor. The batch is only
   needed for its shapes, so one replica's local part serves.
2. `reduce_per_replica` reduces every log value with
   `strategy.reduce("MEAN", value, axis=0)`, which fails on the scalar logs
   ("Invalid reduction dimension 0 for input with 0 dimensions"). Scalars are
   reduced with `axis=None` instead (a mean across workers; metric results are
   already synchronized, so the mean equals each worker's value).

TensorFlow also waits forever for a worker that never starts;
`wait_for_peers` bounds that wait and names the missing peers.

`apply()` patches exactly these two functions, only for the Keras versions in
which the bug was reproduced, and is idempotent. `multi_worker_test.py`
checks that the unpatched functions still fail, so an upstream fix shows up
as a failing test, telling us to narrow `AFFECTED_KERAS_VERSIONS`.
"""

import functools
import logging
import socket
import time

import keras
import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import trainer as tf_trainer

# [first, last] Keras versions (major, minor) in which the bug was seen.
AFFECTED_KERAS_VERSIONS = ((3, 0), (3, 15))

_original_maybe_symbolic_build = (
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build)  # pylint: disable=protected-access
_original_reduce_per_replica = tf_trainer.reduce_per_replica


def keras_version_is_affected(version=None):
  """Whether `version` (default: the installed Keras) has the bug."""
  major, minor = (int(part) for part in
                  (version or keras.__version__).split('.')[:2])
  first, last = AFFECTED_KERAS_VERSIONS
  return first <= (major, minor) <= last


def _local_part(value):
  if isinstance(value, tf.distribute.DistributedValues):
    return value.values[0]
  return value


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
  """`_maybe_symbolic_build` that takes shapes from one replica's batch."""
  if self._distribute_strategy is None or iterator is None:  # pylint: disable=protected-access
    return _original_maybe_symbolic_build(self, iterator=iterator,
                                          data_batch=data_batch)
  for _, _, step_iterator in iterator:
    data_batch = tree.map_structure(_local_part, next(step_iterator))
    break
  with self.distribute_strategy.scope():
    self._symbolic_build(data_batch=data_batch)  # pylint: disable=protected-access


def _is_multi_worker(strategy):
  return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and
          strategy.extended._in_multi_worker_mode())  # pylint: disable=protected-access


@functools.wraps(_original_reduce_per_replica)
def _reduce_per_replica(values, strategy, reduction):
  """`reduce_per_replica` that can reduce scalars across workers."""
  if reduction not in ('auto', 'mean') or not _is_multi_worker(strategy):
    return _original_reduce_per_replica(values, strategy, reduction)

  def reduce_one(value):
    if value.shape.rank == 0:
      return strategy.reduce('MEAN', value, axis=None)
    return _original_reduce_per_replica(value, strategy, reduction)

  return tree.map_structure(reduce_one, values)


def apply():
  """Patches Keras for MultiWorkerMirroredStrategy if its version needs it.

  Returns:
    True if the patch is (now) in place, False for unaffected versions.
  """
  if not keras_version_is_affected():
    return False
  tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build  # pylint: disable=protected-access
  tf_trainer.reduce_per_replica = _reduce_per_replica
  return True


def _split_host(host):
  name, _, port = host.rpartition(':')
  return name.strip('[]'), int(port)


def wait_for_peers(own_host, hosts, timeout_seconds, poll_seconds=0.5):
  """Returns once every task of the cluster has started, or raises.

  Listens on this task's own port (so peers can see it) and connects to
  every other `host:port` until all answer. TensorFlow's own server takes
  the port over right after.

  Args:
    own_host: This task's `host:port` in TF_CONFIG.
    hosts: Every task's `host:port`.
    timeout_seconds: How long to wait for all of them.
    poll_seconds: Pause between rounds of connection attempts.

  Raises:
    TimeoutError: some peers did not answer in time; they are named.
    OSError: this task's port is taken by another program.
  """
  _, own_port = _split_host(own_host)
  listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    listener.bind(('', own_port))
  except OSError as error:
    listener.close()
    raise OSError(f'Port {own_port} of this task ({own_host} in TF_CONFIG) '
                  f'is in use by another program: {error}') from error
  listener.listen(128)
  pending = [host for host in hosts if host != own_host]
  deadline = time.monotonic() + timeout_seconds
  try:
    while pending:
      for host in list(pending):
        try:
          socket.create_connection(_split_host(host), timeout=1).close()
          pending.remove(host)
        except OSError:
          pass
      if pending and time.monotonic() > deadline:
        raise TimeoutError(
            f'{len(pending)} task(s) of TF_CONFIG did not start within '
            f'{timeout_seconds} s: {pending}. Start every task, check the '
            'host names and ports in TF_CONFIG and that the ports are open.')
      if pending:
        time.sleep(poll_seconds)
  finally:
    listener.close()
  logging.info('All %d tasks of the cluster are up.', len(hosts))
