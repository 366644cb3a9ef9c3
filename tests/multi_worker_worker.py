"""One worker of tests/multi_worker_test.py: 3 steps of a tiny Classifier,
then precise BN of a small BN model on the same batches.

Usage: multi_worker_worker.py OUT.npz [--patch]   (TF_CONFIG from the
environment; without TF_CONFIG it trains alone, on the same global batches).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from keras_sft.models import batch_norm  # pylint: disable=g-import-not-at-top
from keras_sft.models import classifier  # pylint: disable=g-import-not-at-top
from keras_sft.models import precise_bn  # pylint: disable=g-import-not-at-top
from keras_sft.training import multi_worker  # pylint: disable=g-import-not-at-top


def main(out, patch):
  if patch:
    multi_worker.apply()
  if 'TF_CONFIG' in os.environ:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
  else:
    strategy = tf.distribute.get_strategy()
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(24, 8, 8, 3)).astype('float32')
  labels = rng.integers(0, 5, 24)
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
  with strategy.scope():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    network = keras.Model(inputs, keras.layers.Dense(5)(x))
    model = classifier.Classifier(network, weight_decay=0.05)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  history = model.fit(dataset, epochs=1, verbose=0).history
  np.savez(out, *model.get_weights())
  with open(out + '.json', 'w') as file:
    json.dump({key: values[-1] for key, values in history.items()}, file)
  # Precise BN: each worker sees its part of every global batch; the
  # statistics are gathered, so all set those of the whole batches.
  with strategy.scope():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    probe = keras.Model(inputs, batch_norm.BatchNormalization(name='bn')(x))
  precise_bn.reestimate(probe, dataset, strategy)
  layer = probe.get_layer('bn')
  np.savez(out + '.bn.npz', mean=np.asarray(layer.moving_mean),
           variance=np.asarray(layer.moving_variance))


if __name__ == '__main__':
  main(sys.argv[1], '--patch' in sys.argv[2:])
