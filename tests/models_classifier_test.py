"""Tests of the CE + λ·R(θ) train_step, alone and under MirroredStrategy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import default as default_lib
from keras_sft import errors
from keras_sft.models import classifier
from keras_sft.models import network as network_lib
from keras_sft.training import precision

_LAMBDA = 0.05
_NUM_CLASSES = 5


def _network(freeze_batchnorm=False):
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(4, 3, name='conv')(inputs)
  x = keras.layers.BatchNormalization(name='bn')(x)
  x = keras.layers.ReLU()(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  outputs = keras.layers.Dense(_NUM_CLASSES, name='head')(x)
  network = keras.Model(inputs, outputs)
  if freeze_batchnorm:
    # A non-trainable BatchNormalization runs in inference mode in Keras 3.
    network.get_layer('bn').trainable = False
  return network


def _batch(seed=0, size=8):
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 1, (size, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, _NUM_CLASSES, size).astype(np.int64)
  return images, labels


def _compile(model, learning_rate=0.1, momentum=0.0):
  model.compile(
      optimizer=keras.optimizers.SGD(learning_rate, momentum=momentum),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=[keras.metrics.SparseCategoricalAccuracy(name='accuracy')])


def _model(initial_weights=None, freeze_batchnorm=False, options=None,
           seed=1, **compile_kwargs):
  """A compiled Classifier; `options`: more of its arguments."""
  keras.utils.set_random_seed(seed)
  model = classifier.Classifier(_network(freeze_batchnorm), _LAMBDA,
                                **(options or {}))
  _compile(model, **compile_kwargs)
  model(np.zeros((1, 8, 8, 3), np.float32))
  if initial_weights is not None:
    model.set_weights(initial_weights)
  return model


def test_l2_is_lambda_times_sum_of_squared_kernels_only():
  """λ·Σ‖w‖² over the Conv and Dense kernels; biases and BN excluded."""
  model = _model()
  network = model.network
  kernels = [network.get_layer('conv').kernel, network.get_layer('head').kernel]
  decayed = classifier.decayed_variables(network)
  assert [v.path for v in decayed] == [v.path for v in kernels]
  expected = _LAMBDA * sum(
      np.sum(np.square(keras.ops.convert_to_numpy(v))) for v in kernels)
  np.testing.assert_allclose(
      float(model.regularization()), expected, rtol=1e-6)


def test_resnet50_decays_exactly_its_trainable_kernels():
  """On the real network: every Conv/Dense kernel, nothing else."""
  network = network_lib.create_network(10, 32, weights=None)
  decayed = {v.path for v in classifier.decayed_variables(network)}
  kernels = {v.path for v in network.trainable_variables
             if v.path.endswith('/kernel')}
  assert decayed == kernels
  assert not any('bn' in path or 'bias' in path for path in decayed)
  # Frozen kernels are not decayed (staged fine-tuning freezes layers).
  network.get_layer('resnet50').get_layer('conv1_conv').trainable = False
  decayed_after = {v.path for v in classifier.decayed_variables(network)}
  assert decayed_after == decayed - {
      network.get_layer('resnet50').get_layer('conv1_conv').kernel.path}


def test_one_sgd_step_follows_the_gradient_of_ce_plus_l2():
  """w ← w − lr·(∂CE/∂w + 2λw·[w is a kernel]) within 1e-6."""
  learning_rate = 0.1
  model = _model(learning_rate=learning_rate)
  images, labels = _batch()
  variables = model.trainable_variables
  before = [keras.ops.convert_to_numpy(v) for v in variables]
  with tf.GradientTape() as tape:
    logits = model.network(images, training=True)
    ce = tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
  ce_gradients = tape.gradient(ce, [v.value for v in variables])
  decayed = {v.path for v in classifier.decayed_variables(model.network)}

  model.train_on_batch(images, labels)

  for variable, old, gradient in zip(variables, before, ce_gradients):
    decay = 2 * _LAMBDA * old if variable.path in decayed else 0.0
    expected = old - learning_rate * (gradient.numpy() + decay)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(variable), expected, atol=1e-6,
        err_msg=variable.path)


def test_logs_split_loss_into_ce_and_l2_in_fit_and_evaluate():
  """fit and evaluate log loss = ce + l2, with l2 = λ·R(θ)."""
  model = _model()
  images, labels = _batch()
  history = model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
  for key in ('loss', 'ce', 'l2', 'accuracy'):
    assert key in history.history, key
  results = model.evaluate(images, labels, batch_size=8, return_dict=True,
                           verbose=0)
  np.testing.assert_allclose(results['loss'], results['ce'] + results['l2'],
                             rtol=1e-6)
  np.testing.assert_allclose(results['l2'], float(model.regularization()),
                             rtol=1e-6)
  logits = model.predict(images, verbose=0)
  ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
      labels, logits)
  np.testing.assert_allclose(results['ce'], float(ce), rtol=1e-5)


def _train_three_steps(strategy, initial_weights, options=None):
  images, labels = _batch(seed=3, size=24)
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
  with strategy.scope():
    model = _model(initial_weights, freeze_batchnorm=True, options=options,
                   momentum=0.9)
  history = model.fit(dataset, epochs=1, shuffle=False, verbose=0)
  return model, history.history


@pytest.mark.parametrize('scale_l2', [True, False])
def test_two_replicas_match_one_replica(monkeypatch, scale_l2):
  """MirroredStrategy on 2 CPUs = 1 device after 3 steps, within 1e-5.

  With the replica scaling of λ·R(θ) removed (scale_l2=False), the decay is
  counted twice and the weights must differ: the test can fail.
  """
  initial_weights = _model().get_weights()
  one = _train_three_steps(tf.distribute.get_strategy(), initial_weights)
  if not scale_l2:
    monkeypatch.setattr(classifier.loss_module,
                        'scale_loss_for_distribution', lambda value: value)
  devices = [d.name for d in tf.config.list_logical_devices('CPU')[:2]]
  mirrored = tf.distribute.MirroredStrategy(devices)
  assert mirrored.num_replicas_in_sync == 2
  two = _train_three_steps(mirrored, initial_weights)

  difference = max(
      np.max(np.abs(a - b))
      for a, b in zip(one[0].get_weights(), two[0].get_weights()))
  if scale_l2:
    assert difference < 1e-5
    for key in ('loss', 'ce', 'l2'):
      np.testing.assert_allclose(one[1][key], two[1][key], rtol=1e-5,
                                 err_msg=key)
  else:
    assert difference > 1e-4


def test_keras_file_round_trip(tmp_path):
  """A `.keras` file restores the class, λ, the weights and the outputs."""
  model = _model()
  images, labels = _batch()
  model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
  path = str(tmp_path / 'model.keras')
  model.save(path)
  restored = keras.models.load_model(path)
  assert isinstance(restored, classifier.Classifier)
  assert restored.weight_decay == _LAMBDA
  np.testing.assert_allclose(restored.predict(images, verbose=0),
                             model.predict(images, verbose=0), atol=1e-6)
  restored.fit(images, labels, batch_size=8, epochs=1, verbose=0)


def test_negative_weight_decay_is_refused():
  with pytest.raises(ValueError, match='weight_decay=-1'):
    classifier.Classifier(_network(), weight_decay=-1.0)


def _staged_model(head_only_steps=3, backbone_multiplier=1.0, momentum=0.9):
  keras.utils.set_random_seed(1)
  model = classifier.Classifier(_network(), _LAMBDA,
                                backbone_multiplier=backbone_multiplier,
                                head_only_steps=head_only_steps)
  _compile(model, momentum=momentum)
  model(np.zeros((1, 8, 8, 3), np.float32))
  return model


def _backbone_and_head(model):
  network = model.network
  backbone = [np.asarray(v) for layer in ('conv', 'bn')
              for v in network.get_layer(layer).trainable_variables]
  head = [np.asarray(v) for v in network.get_layer('head').trainable_variables]
  return backbone, head


def _step(model, seed):
  images, labels = _batch(seed=seed)
  model.train_on_batch(images, labels)


def test_backbone_frozen_in_head_only_phase_and_trains_after():
  model = _staged_model(head_only_steps=3)
  backbone, head = _backbone_and_head(model)
  for seed in range(3):
    _step(model, seed)
  backbone_3, head_3 = _backbone_and_head(model)
  for before, after in zip(backbone, backbone_3):
    np.testing.assert_array_equal(before, after)  # frozen: no CE, no decay
  assert all(not np.allclose(a, b) for a, b in zip(head, head_3))
  _step(model, 3)
  backbone_4, _ = _backbone_and_head(model)
  assert all(not np.allclose(a, b) for a, b in zip(backbone_3, backbone_4))


def test_resume_across_the_phase_boundary_matches_an_uninterrupted_run(
    tmp_path):
  reference = _staged_model(head_only_steps=2)
  for seed in range(4):
    _step(reference, seed)
  first = _staged_model(head_only_steps=2)
  _step(first, 0)
  path = str(tmp_path / 'ckpt.weights.h5')
  first.save_weights(path)  # a backup inside the head-only phase
  resumed = _staged_model(head_only_steps=2)
  resumed.optimizer.build(resumed.trainable_variables)
  resumed.load_weights(path)
  assert int(resumed.optimizer.iterations.numpy()) == 1
  for seed in range(1, 4):
    _step(resumed, seed)
  for a, b in zip(reference.get_weights(), resumed.get_weights()):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_backbone_multiplier_equals_a_backbone_learning_rate():
  """SGD step: multiplier m on the backbone = backbone trained at m·lr."""
  multiplier = 0.25
  scaled = _staged_model(head_only_steps=0, backbone_multiplier=multiplier)
  slow = _staged_model(head_only_steps=0)
  _compile(slow, learning_rate=0.1 * multiplier, momentum=0.9)
  slow.set_weights(scaled.get_weights())
  start = _backbone_and_head(scaled)[0]
  _step(scaled, 0)
  _step(slow, 0)
  scaled_backbone, scaled_head = _backbone_and_head(scaled)
  slow_backbone, slow_head = _backbone_and_head(slow)
  for a, b in zip(scaled_backbone, slow_backbone):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert not np.allclose(scaled_backbone[0], start[0])  # the conv kernel
  # The head keeps the base LR: 4x the slow model's head step.
  assert not np.allclose(scaled_head[0], slow_head[0])


class _Scale(keras.layers.Layer):
  """logits = x·w elementwise: the gradient follows the input's values."""

  def build(self, input_shape):
    self.w = self.add_weight(shape=(2,), initializer='ones', name='w')

  def call(self, inputs):
    return tf.cast(inputs, self.w.dtype) * self.w


def _float16_step(strategy, images):
  """One mixed_float16 SGD step on a global batch of len(images) examples.

  Returns the head's per-replica values, the optimizer step and the
  per-replica loss scales.
  """
  with strategy.scope(), precision.global_policy('mixed_float16'):
    inputs = keras.Input((2,))
    outputs = _Scale(dtype='float32', name='head')(inputs)
    model = classifier.Classifier(keras.Model(inputs, outputs))
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model(np.zeros((1, 2), np.float32))
  assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
  labels = np.arange(len(images)) % 2
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(
      len(images))
  model.fit(dataset, shuffle=False, verbose=0)

  def per_replica(variable):
    return [np.asarray(value) for value in
            strategy.experimental_local_results(variable.value)]

  return (per_replica(model.network.get_layer('head').w),
          int(model.optimizer.iterations.numpy()),
          per_replica(model.optimizer.dynamic_scale))


def _two_replicas():
  # Reduction by copying, not collectives: collective keys of several
  # MirroredStrategy objects in one process collide.
  return tf.distribute.MirroredStrategy(
      ['/cpu:0', '/cpu:1'],
      cross_device_ops=tf.distribute.ReductionToOneDevice())


@pytest.mark.parametrize('overflowing_replica', [0, 1])
def test_float16_overflow_on_one_replica_skips_the_step_on_all(
    overflowing_replica):
  """Every replica skips together and halves the same loss scale.

  Keras' LossScaleOptimizer decides from the first replica's gradients
  only; an overflow on replica 1 was applied (weights NaN, step counted).
  """
  images = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
  images[overflowing_replica, 0] = np.inf
  weights, step, scales = _float16_step(_two_replicas(), images)
  for replica_weights in weights:
    np.testing.assert_array_equal(replica_weights, [1.0, 1.0])
  assert step == 0
  assert scales == [2.0**14, 2.0**14]  # 2^15 halved, on both replicas


def test_float16_finite_step_on_two_replicas_equals_one_device():
  images = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
  one, one_step, _ = _float16_step(tf.distribute.get_strategy(), images)
  two, two_step, scales = _float16_step(_two_replicas(), images)
  assert one_step == two_step == 1
  assert not np.allclose(one[0], [1.0, 1.0])  # the step moved the weights
  for replica_weights in two:
    np.testing.assert_allclose(replica_weights, one[0], rtol=1e-6)
  assert scales == [2.0**15, 2.0**15]


def _config(**overrides):
  config = default_lib.get_config()
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.mark.parametrize('freeze_batchnorm', [False, True])
def test_head_only_phase_moves_bn_statistics_unless_frozen(freeze_batchnorm):
  """What README says of the head-only phase: BatchNorm keeps its policy.

  γ and β are frozen (gradient x 0), but a trainable BatchNorm still
  normalizes with batch statistics and its moving statistics follow the
  batches; batch_norm='frozen' (non-trainable) keeps them.
  """
  keras.utils.set_random_seed(1)
  model = classifier.Classifier(_network(freeze_batchnorm), _LAMBDA,
                                head_only_steps=2)
  _compile(model, momentum=0.9)
  model(np.zeros((1, 8, 8, 3), np.float32))
  bn = model.network.get_layer('bn')
  before = [np.asarray(v) for v in bn.weights]
  _step(model, 0)
  _step(model, 1)
  assert int(model.optimizer.iterations.numpy()) == 2  # still head-only
  after = {v.name: np.asarray(v) for v in bn.weights}
  for variable, old in zip(bn.weights, before):
    moved = not np.array_equal(after[variable.name], old)
    expected = (not freeze_batchnorm and
                variable.name in ('moving_mean', 'moving_variance'))
    assert moved == expected, variable.name


# --- L2-SP, gradient clipping, gradient accumulation ---------------------------

_PRETRAINED = {'weight_decay_target': 'pretrained'}


def _numpy(variable):
  return np.array(keras.ops.convert_to_numpy(variable))


def test_l2_sp_value_and_gradient_follow_the_hand_computation():
  """λ·(‖conv − conv₀‖² + ‖head‖²); gradient 2λ(w − w₀) and 2λw."""
  model = _model(options=_PRETRAINED)
  conv = model.network.get_layer('conv').kernel
  head = model.network.get_layer('head').kernel
  assert list(model.anchors) == [conv.path]  # the head has no anchor
  anchor = _numpy(model.anchors[conv.path])
  np.testing.assert_array_equal(anchor, _numpy(conv))  # w₀ = w at build
  rng = np.random.default_rng(0)
  conv.assign(anchor + rng.normal(0, 0.1, anchor.shape).astype(np.float32))
  with tf.GradientTape() as tape:
    penalty = model.regularization()
  gradients = tape.gradient(penalty, [conv.value, head.value])
  expected = _LAMBDA * (np.sum(np.square(_numpy(conv) - anchor)) +
                        np.sum(np.square(_numpy(head))))
  np.testing.assert_allclose(float(penalty), expected, rtol=1e-6)
  np.testing.assert_allclose(gradients[0], 2 * _LAMBDA * (_numpy(conv) - anchor),
                             rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(gradients[1], 2 * _LAMBDA * _numpy(head),
                             rtol=1e-6)
  # 'zero' decays the conv kernel toward 0: a different value.
  zero = _model()
  zero.set_weights([w for w, v in zip(model.get_weights(), model.weights)
                    if not v.name.startswith('anchor_')])
  assert abs(float(zero.regularization()) - expected) > 1e-3


def test_l2_sp_anchors_are_in_backups_and_not_in_exports(tmp_path):
  """A resumed run decays toward the saved w₀, not its own build's."""
  reference = _model(options=_PRETRAINED)
  first = _model(options=_PRETRAINED)
  for seed in range(4):
    _step(reference, seed)
  _step(first, 0)
  path = str(tmp_path / 'ckpt.weights.h5')
  first.save_weights(path)
  # Built from other initial weights: its own anchors differ.
  resumed = _model(options=_PRETRAINED, seed=2)
  resumed.optimizer.build(resumed.trainable_variables)
  [anchor] = resumed.anchors.values()
  assert not np.allclose(_numpy(anchor),
                         _numpy(list(reference.anchors.values())[0]))
  resumed.load_weights(path)
  for seed in range(1, 4):
    _step(resumed, seed)
  for a, b in zip(reference.get_weights(), resumed.get_weights()):
    np.testing.assert_allclose(a, b, atol=1e-6)
  served = {id(v) for v in classifier.serving_variables(resumed)}
  assert id(anchor) not in served
  assert len(served) == len(resumed.variables) - 1


@pytest.mark.parametrize('overrides, message', [
    (dict(weight_decay_target='pretrained', weights=None), 'weights=None'),
    (dict(weight_decay_target='sp'), "weight_decay_target='sp'"),
    (dict(clip_global_norm=0.0), 'clip_global_norm=0.0'),
    (dict(gradient_accumulation_steps=0), 'gradient_accumulation_steps=0'),
    (dict(gradient_accumulation_steps=3, global_batch_size=128),
     'Use a divisor of 128'),
])
def test_bad_values_are_refused(overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    classifier.check_config(_config(**overrides))


def _gradient_of_loss(model, images, labels):
  """∂(CE + λ·R)/∂v for each trainable variable, by a plain tape."""
  variables = model.trainable_variables
  with tf.GradientTape() as tape:
    logits = model.network(images, training=True)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels, logits)) + model.regularization()
  return [g.numpy() for g in tape.gradient(loss, [v.value for v in variables])]


@pytest.mark.parametrize('multiplier, head_only_steps', [(0.5, 0), (1.0, 1)])
def test_clipped_sgd_step_follows_the_hand_computation(multiplier,
                                                       head_only_steps):
  """w ← w − lr·s·min(1, c/‖g‖)·g, ‖g‖ over what the phase trains.

  s is the backbone multiplier on the backbone, 1 on the head; in the
  head-only phase the backbone is out of the norm and does not move.
  """
  learning_rate, clip = 0.1, 0.05
  keras.utils.set_random_seed(1)
  model = classifier.Classifier(
      _network(freeze_batchnorm=True), _LAMBDA, clip_global_norm=clip,
      backbone_multiplier=multiplier, head_only_steps=head_only_steps)
  _compile(model, learning_rate=learning_rate)
  model(np.zeros((1, 8, 8, 3), np.float32))
  images, labels = _batch()
  variables = model.trainable_variables
  before = [_numpy(v) for v in variables]
  gradients = _gradient_of_loss(model, images, labels)
  head = {id(v) for v in model.network.get_layer('head').weights}
  trains_backbone = 0.0 if head_only_steps else 1.0
  squared = sum(np.sum(np.square(g)) * (1.0 if id(v) in head else
                                        trains_backbone)
                for g, v in zip(gradients, variables))
  factor = min(1.0, clip / np.sqrt(squared))
  assert factor < 0.5  # the clip is active

  model.train_on_batch(images, labels)

  for variable, old, gradient in zip(variables, before, gradients):
    scale = 1.0 if id(variable) in head else trains_backbone * multiplier
    np.testing.assert_allclose(
        _numpy(variable), old - learning_rate * scale * factor * gradient,
        atol=1e-6, err_msg=variable.path)


def _scale_model(policy, clip):
  with precision.global_policy(policy):
    inputs = keras.Input((2,))
    outputs = _Scale(dtype='float32', name='head')(inputs)
    model = classifier.Classifier(keras.Model(inputs, outputs),
                                  clip_global_norm=clip)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model(np.zeros((1, 2), np.float32))
  return model


def test_clipping_under_loss_scaling_clips_the_unscaled_gradient():
  """mixed_float16 (loss scale 2^15) clips as float32 does."""
  images = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
  labels = np.array([0, 1])
  results = []
  for policy in ('float32', 'mixed_float16'):
    model = _scale_model(policy, clip=0.01)
    model.train_on_batch(images, labels)
    results.append(_numpy(model.network.get_layer('head').w))
  unclipped = _scale_model('float32', clip=None)
  unclipped.train_on_batch(images, labels)
  step = np.linalg.norm(results[0] - 1.0)
  # lr · c; the weights are ~1, so float32 leaves ~1e-4 of a 1e-3 step.
  np.testing.assert_allclose(step, 0.1 * 0.01, rtol=1e-4)
  assert np.linalg.norm(
      _numpy(unclipped.network.get_layer('head').w) - 1.0) > 2 * step
  np.testing.assert_allclose(results[1], results[0], rtol=1e-6)


def test_accumulated_micro_batches_equal_one_batch():
  """k = 4 micro-batches of 2 = one batch of 8 (BN frozen), EMA included."""
  images, labels = _batch(seed=5, size=16)
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
  results = []
  initial_weights = _model(freeze_batchnorm=True).get_weights()
  for steps in (1, 4):
    model = _model(initial_weights, freeze_batchnorm=True,
                   options=dict(gradient_accumulation_steps=steps,
                                clip_global_norm=0.5))
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9, use_ema=True,
                                       ema_momentum=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name='accuracy')],
        # Keras then runs the steps in a tf.while_loop, around the micro-
        # batches: a nested tf.while_loop failed there (Grappler's
        # TemporaryVariable "already exists").
        steps_per_execution=2)
    history = model.fit(dataset, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2
    assert int(model.step_counter.numpy()) == 2
    averages = [_numpy(v) for v in
                model.optimizer._model_variables_moving_average]  # pylint: disable=protected-access
    results.append((model.get_weights(), averages, history.history))
  (one, one_ema, one_log), (four, four_ema, four_log) = results
  for a, b in zip(one + one_ema, four + four_ema):
    np.testing.assert_allclose(a, b, atol=1e-6)
  for key in ('loss', 'ce', 'l2', 'accuracy'):
    np.testing.assert_allclose(one_log[key], four_log[key], rtol=1e-6,
                               err_msg=key)


def test_two_replicas_match_one_replica_with_l2_sp_clip_and_accumulation():
  """2 replicas = 1 device after 3 momentum steps, within 1e-5.

  Each of the three scales by the replica count somewhere (λ·R once, the
  norm of the summed gradient, the micro-batch mean): one run checks them
  together (per-feature runs cost ~4 s each).
  """
  options = dict(weight_decay_target='pretrained', clip_global_norm=0.05,
                 gradient_accumulation_steps=2)
  model = _model(options=options)
  initial_weights = model.get_weights()
  [anchor] = [i for i, v in enumerate(model.weights)
              if v.name.startswith('anchor_')]
  # w₀ away from the weights, so the term's gradient is large.
  initial_weights[anchor] = initial_weights[anchor] + 0.5
  one = _train_three_steps(tf.distribute.get_strategy(), initial_weights,
                           options)
  two = _train_three_steps(_two_replicas(), initial_weights, options)
  for a, b in zip(one[0].get_weights(), two[0].get_weights()):
    np.testing.assert_allclose(a, b, atol=1e-5)
  for key in ('loss', 'ce', 'l2'):
    np.testing.assert_allclose(one[1][key], two[1][key], rtol=1e-5,
                               err_msg=key)


def test_keras_global_clipnorm_clips_each_replica_apart():
  """Why the Classifier clips itself: Keras' own differs on 2 replicas."""
  images, labels = _batch(seed=3, size=8)
  results = []
  initial_weights = _model(freeze_batchnorm=True).get_weights()
  for strategy in (tf.distribute.get_strategy(), _two_replicas()):
    with strategy.scope():
      model = _model(initial_weights, freeze_batchnorm=True)
      model.compile(
          optimizer=keras.optimizers.SGD(0.1, global_clipnorm=0.05),
          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(tf.data.Dataset.from_tensor_slices((images, labels)).batch(8),
              verbose=0)
    results.append(model.get_weights())
  difference = max(np.max(np.abs(a - b)) for a, b in zip(*results))
  assert difference > 1e-4


def test_clipping_a_gradient_whose_squared_norm_overflows_float32():
  """‖g‖ of 1e20 (finite entries, Σg² = inf in float32) is still clipped.

  Hostile pass: the norm came out inf, "clips nothing" applied the whole
  1e20-sized gradient, where clipping exists exactly for such a step.
  """
  images = np.array([[1e20, -3e20], [2e20, 1e20]], np.float32)
  labels = np.array([0, 1])
  model = _scale_model('float32', clip=0.01)
  model.train_on_batch(images, labels)
  step = _numpy(model.network.get_layer('head').w) - 1.0
  assert np.isfinite(step).all()
  np.testing.assert_allclose(np.linalg.norm(step), 0.1 * 0.01, rtol=1e-3)


def test_head_only_clipping_ignores_an_overflowing_backbone_gradient():
  """In the head-only phase the backbone is out of ‖g‖, even when its Σg²
  overflows float32 (0 × inf made the norm NaN: the head went unclipped).
  """
  inputs = keras.Input((2,))
  hidden = keras.layers.Dense(2, kernel_initializer='ones',
                              bias_initializer='ones', name='backbone')(inputs)
  outputs = _Scale(name='head')(hidden)
  model = classifier.Classifier(keras.Model(inputs, outputs),
                                clip_global_norm=0.01, head_only_steps=5)
  model.compile(
      optimizer=keras.optimizers.SGD(0.1),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  # x·W = 0, so the head sees the bias (1) and its gradient is moderate;
  # the backbone kernel's gradient is x ⊗ (∂L/∂h), of size 1e20.
  images = np.array([[1e20, -1e20], [-2e20, 2e20]], np.float32)
  labels = np.array([0, 0])  # The head's gradient: (-0.5, 0.5).
  model.train_on_batch(images, labels)
  step = _numpy(model.network.get_layer('head').w) - 1.0
  np.testing.assert_allclose(step, 0.1 * 0.01 * np.array([1, -1]) / np.sqrt(2),
                             rtol=1e-3)
  np.testing.assert_array_equal(
      _numpy(model.network.get_layer('backbone').kernel), np.ones((2, 2)))
