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

`apply()` patches exactly these two functions, only for the Keras versions in
which the bug was reproduced, and is idempotent. `multi_worker_test.py`
checks that the unpatched functions still fail, so an upstream fix shows up
as a failing test, telling us to narrow `AFFECTED_KERAS_VERSIONS`.
"""

import functools

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
