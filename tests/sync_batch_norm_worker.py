"""Prints {policy: max |weights(2 replicas) - weights(1 device)|} as JSON.

One SGD step of a small Conv-BN network with BN in training mode, on one
device and under MirroredStrategy on 2 logical CPUs (one strategy for both
policies). Run by tests/models_backbones_test.py in its own process.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tensorflow as tf  # pylint: disable=g-import-not-at-top

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices('CPU')[0],
    [tf.config.LogicalDeviceConfiguration()] * 2)

import models_backbones_test  # pylint: disable=g-import-not-at-top


def _one_step(strategy, policy, initial_weights):
  images, labels = models_backbones_test._data()  # pylint: disable=protected-access
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
  with strategy.scope():
    model = models_backbones_test._model(policy, initial_weights)  # pylint: disable=protected-access
  model.fit(dataset, epochs=1, verbose=0)
  return model.get_weights()


def main():
  initial = models_backbones_test._model('trained').get_weights()  # pylint: disable=protected-access
  one = _one_step(tf.distribute.get_strategy(), 'trained', initial)
  devices = [d.name for d in tf.config.list_logical_devices('CPU')[:2]]
  mirrored = tf.distribute.MirroredStrategy(devices)
  differences = {}
  for policy in ('synchronized', 'trained'):
    two = _one_step(mirrored, policy, initial)
    differences[policy] = float(
        max(abs(a - b).max() for a, b in zip(one, two)))
  print(json.dumps(differences))


if __name__ == '__main__':
  main()
