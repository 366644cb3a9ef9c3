"""Tests of keras_sft.training.optimizers: LR scaling, schedule and optimizers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import default as default_lib
from keras_sft import errors
from keras_sft.training import optimizers


def _evaluate(schedule, steps):
  return np.array([float(schedule(tf.constant(step, tf.int64)))
                   for step in steps])


def _expected_schedule(steps, peak, total_steps, warmup_steps):
  """Linear warmup to `peak`, then 0.5·peak·(1 + cos(π·t)), in numpy."""
  steps = np.asarray(steps, np.float64)
  warmup = peak * steps / max(warmup_steps, 1)
  fraction = np.clip((steps - warmup_steps) / (total_steps - warmup_steps),
                     0.0, 1.0)
  cosine = 0.5 * peak * (1.0 + np.cos(np.pi * fraction))
  return np.where(steps < warmup_steps, warmup, cosine)


@pytest.mark.parametrize('learning_rate,global_batch_size,reference', [
    (0.1, 256, 256),
    (0.1, 512, 256),
    (0.01, 96, 32),
    (0.4, 8, 1024),
])
def test_scaled_learning_rate(learning_rate, global_batch_size, reference):
  """The LR is scaled linearly with the batch: lr · batch / reference."""
  got = optimizers.scaled_learning_rate(learning_rate, global_batch_size,
                                        reference)
  assert got == pytest.approx(learning_rate * global_batch_size / reference)


def test_scaled_learning_rate_default_reference_is_256():
  """Without a reference batch size, the LR refers to a batch of 256."""
  assert optimizers.scaled_learning_rate(0.1, 1024) == pytest.approx(
      0.1 * 1024 / 256)


def test_schedule_with_warmup_matches_numpy():
  """0 at step 0, linear warmup, peak at its end, cosine to 0 after."""
  peak, total, warmup = 0.4, 100, 10
  schedule = optimizers.create_schedule(peak, total, warmup)
  steps = np.arange(0, total + 11)
  got = _evaluate(schedule, steps)
  np.testing.assert_allclose(
      got, _expected_schedule(steps, peak, total, warmup), rtol=1e-5,
      atol=1e-7)
  assert got[0] == 0.0
  assert got[warmup] == pytest.approx(peak, rel=1e-6)
  assert got[warmup // 2] == pytest.approx(peak / 2, rel=1e-6)
  assert np.all(np.diff(got[:warmup + 1]) > 0), 'Warmup must increase.'
  assert np.all(np.diff(got[warmup:total + 1]) < 0), 'Decay must decrease.'
  midpoint = warmup + (total - warmup) // 2
  assert got[midpoint] == pytest.approx(peak / 2, rel=1e-5)
  assert got[total] == pytest.approx(0.0, abs=1e-7)
  assert np.all(np.abs(got[total:]) <= 1e-7), 'Must stay at 0 after the end.'


def test_schedule_without_warmup_starts_at_peak():
  """With no warmup the schedule is a plain cosine from the peak."""
  peak, total = 0.25, 40
  schedule = optimizers.create_schedule(peak, total)
  steps = np.arange(0, total + 1)
  got = _evaluate(schedule, steps)
  assert got[0] == pytest.approx(peak, rel=1e-6)
  np.testing.assert_allclose(
      got, _expected_schedule(steps, peak, total, 0), rtol=1e-5, atol=1e-7)
  assert got[-1] == pytest.approx(0.0, abs=1e-7)


def test_schedule_warmup_of_one_step():
  """The shortest warmup: 0 at step 0, the peak at step 1."""
  peak, total = 1.0, 5
  got = _evaluate(optimizers.create_schedule(peak, total, 1), range(total + 1))
  np.testing.assert_allclose(
      got, _expected_schedule(np.arange(total + 1), peak, total, 1),
      rtol=1e-5, atol=1e-7)
  assert got[0] == 0.0 and got[1] == pytest.approx(peak)


@pytest.mark.parametrize('total_steps,warmup_steps,named', [
    (0, 0, 'total_steps'),
    (-5, 0, 'total_steps'),
    (10, 10, 'warmup_steps=10'),
    (10, 11, 'warmup_steps=11'),
    (10, -1, 'warmup_steps=-1'),
])
def test_schedule_rejects_bad_steps(total_steps, warmup_steps, named):
  """Non-positive total or warmup outside [0, total) is a ValueError."""
  with pytest.raises(ValueError) as error:
    optimizers.create_schedule(0.1, total_steps, warmup_steps)
  assert named in str(error.value)
  assert str(total_steps) in str(error.value)


def test_create_optimizer_sgd():
  """'sgd' is (fused) SGD with the given LR, momentum and Nesterov flag."""
  optimizer = optimizers.create_optimizer('sgd', 0.05, momentum=0.8,
                                          nesterov=True)
  assert isinstance(optimizer, optimizers.FusedSGD)
  assert optimizer.momentum == pytest.approx(0.8)
  assert optimizer.nesterov is True
  assert float(optimizer.learning_rate) == pytest.approx(0.05)


def test_create_optimizer_takes_a_schedule():
  """A schedule passed as the LR drives the optimizer's LR."""
  schedule = optimizers.create_schedule(0.3, 20, 4)
  optimizer = optimizers.create_optimizer('sgd', schedule)
  # At iteration 0 the warmup starts from 0.
  assert float(optimizer.learning_rate) == pytest.approx(0.0)
  optimizer.iterations.assign(4)
  assert float(optimizer.learning_rate) == pytest.approx(0.3, rel=1e-6)


def test_create_optimizer_adamw():
  """'adamw' is AdamW with the given decoupled weight decay."""
  optimizer = optimizers.create_optimizer('adamw', 1e-3,
                                          adamw_weight_decay=0.05)
  assert isinstance(optimizer, keras.optimizers.AdamW)
  assert optimizer.weight_decay == pytest.approx(0.05)
  assert float(optimizer.learning_rate) == pytest.approx(1e-3)


@pytest.mark.parametrize('name', ['adam', 'SGD', 'rmsprop', ''])
def test_create_optimizer_unknown_raises(name):
  """Any other name is a ValueError naming it."""
  with pytest.raises(ValueError, match=f'optimizer={name!r}'):
    optimizers.create_optimizer(name, 0.1)


def test_adamw_decays_kernels_but_not_biases_or_batchnorm():
  """With zero gradients, AdamW shrinks kernels only (by lr·wd).

  Biases and BatchNorm scales/offsets keep their values.
  """
  learning_rate, weight_decay = 0.1, 0.5
  inputs = keras.Input((4,))
  hidden = keras.layers.Dense(3, bias_initializer='ones')(inputs)
  outputs = keras.layers.BatchNormalization(
      beta_initializer='ones', gamma_initializer=keras.initializers.Constant(
          2.0))(hidden)
  model = keras.Model(inputs, outputs)
  variables = model.trainable_variables
  before = {variable.path: variable.numpy().copy() for variable in variables}
  optimizer = optimizers.create_optimizer(
      'adamw', learning_rate, adamw_weight_decay=weight_decay)
  optimizer.apply([tf.zeros_like(variable) for variable in variables],
                  variables)
  kernels = [v for v in variables if v.name == 'kernel']
  others = [v for v in variables if v.name != 'kernel']
  assert len(kernels) == 1
  assert sorted(v.name for v in others) == ['beta', 'bias', 'gamma']
  for kernel in kernels:
    np.testing.assert_allclose(
        kernel.numpy(),
        before[kernel.path] * (1.0 - learning_rate * weight_decay),
        rtol=1e-6)
    assert not np.allclose(kernel.numpy(), before[kernel.path])
  for variable in others:
    assert np.any(before[variable.path] != 0), 'Would not show a decay.'
    np.testing.assert_array_equal(variable.numpy(), before[variable.path])


def _ema_model(ema_momentum):
  from keras_sft.models import classifier  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  inputs = keras.Input((6,))
  x = keras.layers.Dense(4, activation='relu', name='hidden')(inputs)
  network = keras.Model(inputs, keras.layers.Dense(3, name='head')(x))
  model = classifier.Classifier(network, weight_decay=0.01)
  model.compile(
      optimizer=optimizers.create_optimizer('sgd', 0.3, momentum=0.9,
                                            ema_momentum=ema_momentum),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return model


class _RawWeights(keras.callbacks.Callback):

  def __init__(self):
    super().__init__()
    self.steps = []

  def on_train_batch_end(self, batch, logs=None):
    self.steps.append([np.asarray(v) for v in self.model.trainable_variables])


def test_ema_weights_equal_the_formula_after_k_steps(tmp_path):
  momentum, steps = 0.8, 5
  model = _ema_model(momentum)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 6)).astype(np.float32)
  y = rng.integers(0, 3, 40)
  raw = _RawWeights()
  model.fit(x, y, batch_size=8, epochs=1, callbacks=[raw], verbose=0,
            shuffle=False)
  assert len(raw.steps) == steps
  # ema_1 = w_1; ema_t = m_t·ema_{t-1} + (1 - m_t)·w_t, in float64, with
  # the warm-up m_t = min(m, t / (9 + t)) (TF's num_updates rule).
  expected = [w.astype(np.float64) for w in raw.steps[0]]
  for t, weights in enumerate(raw.steps[1:], start=2):
    m_t = min(momentum, t / (9 + t))
    expected = [m_t * e + (1 - m_t) * w for e, w in zip(expected, weights)]
  # fit swapped the averages in at its end.
  final = [np.asarray(v) for v in model.trainable_variables]
  for got, want, last in zip(final, expected, raw.steps[-1]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, last)  # really the average, not w_5

  # The averages are optimizer variables: a backup carries them.
  path = str(tmp_path / 'ckpt.weights.h5')
  model.save_weights(path)
  restored = _ema_model(momentum)
  restored(x[:1])
  restored.optimizer.build(restored.trainable_variables)
  restored.load_weights(path)
  restored.optimizer.finalize_variable_values(restored.trainable_weights)
  for got, want in zip(restored.trainable_variables, final):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_no_ema_by_default_and_bad_momentum_is_named():
  assert not optimizers.create_optimizer('sgd', 0.1).use_ema
  assert optimizers.create_optimizer('adamw', 0.1, ema_momentum=0.9).use_ema
  with pytest.raises(ValueError, match='ema_momentum=1.5'):
    optimizers.create_optimizer('sgd', 0.1, ema_momentum=1.5)


def _trained_variables(optimizer, strategy, steps=3):
  """Variables of a tiny Conv/BN/Dense model after `steps` fit steps."""
  with strategy.scope():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6, 6, 3)),
        keras.layers.Conv2D(4, 3),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(5),
    ])
    model.compile(optimizer=optimizer(), loss=keras.losses.
                  SparseCategoricalCrossentropy(from_logits=True))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(8 * steps, 6, 6, 3)).astype(np.float32)
  labels = rng.integers(0, 5, 8 * steps)
  model.fit(images, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
  return [np.asarray(v) for v in model.variables + model.optimizer.variables]


@pytest.mark.parametrize('nesterov', [False, True])
@pytest.mark.parametrize('replicas', [1, 2])
def test_fused_sgd_matches_keras_sgd(nesterov, replicas):
  """Same weights and momenta as Keras' SGD after steps with a schedule."""
  # Reduction by copying, not collectives: collective keys of several
  # MirroredStrategy objects in one process (other test files) collide.
  strategy = (tf.distribute.get_strategy() if replicas == 1 else
              tf.distribute.MirroredStrategy(
                  ['/cpu:0', '/cpu:1'],
                  cross_device_ops=tf.distribute.ReductionToOneDevice()))

  def make(cls):
    def optimizer():
      schedule = optimizers.create_schedule(0.5, 10, 2)
      return cls(schedule, momentum=0.9, nesterov=nesterov)
    return optimizer

  expected = _trained_variables(make(keras.optimizers.SGD), strategy)
  actual = _trained_variables(make(optimizers.FusedSGD), strategy)
  assert len(actual) == len(expected)
  for want, got in zip(expected, actual):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The weights moved: the comparison is not of two untouched models.
  assert not np.allclose(_trained_variables(make(optimizers.FusedSGD),
                                            strategy, steps=1)[0], actual[0])


def test_fused_sgd_without_momentum_and_in_a_keras_file(tmp_path):
  """momentum=0 runs Keras' update; the class survives save and load."""
  expected = _trained_variables(
      lambda: keras.optimizers.SGD(0.1), tf.distribute.get_strategy())
  actual = _trained_variables(
      lambda: optimizers.FusedSGD(0.1), tf.distribute.get_strategy())
  for want, got in zip(expected, actual):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  model.compile(optimizer=optimizers.FusedSGD(0.1, momentum=0.9), loss='mse')
  model.fit(np.ones((2, 2)), np.ones((2, 1)), verbose=0)
  path = str(tmp_path / 'model.keras')
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded.optimizer, optimizers.FusedSGD)
  assert loaded.optimizer.momentum == pytest.approx(0.9)


def test_fused_sgd_and_batch_norm_compile_under_xla():
  """jit_compile=True (the GPU default of jit_compile='auto') lowers both
  fused kernels and gives the same weights as without XLA."""
  from keras_sft.models import batch_norm  # pylint: disable=g-import-not-at-top
  results = []
  for jit_compile in (False, True):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = batch_norm.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(5)(x))
    model.compile(optimizer=optimizers.FusedSGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True), jit_compile=jit_compile)
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(16, 6, 6, 3)).astype(np.float32),
              rng.integers(0, 5, 16), batch_size=8, shuffle=False, verbose=0)
    results.append(model.get_weights())
  for want, got in zip(*results):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_ema_warm_up_reaches_the_configured_momentum():
  """Early averages follow the weights; later ones use m itself."""
  def momentum(m, iterations):
    return float(optimizers.ema_momentum_at(m, iterations))

  assert momentum(0.999, 0) == 0.0  # The first step copies the weights.
  assert momentum(0.999, 1) == pytest.approx(2 / 11)
  assert momentum(0.999, 100) == pytest.approx(101 / 110)
  assert momentum(0.9, 10**6) == pytest.approx(0.9)


@pytest.mark.parametrize('adamw_weight_decay', [0.0, 0.05])
def test_adamw_with_a_head_only_phase_is_refused(adamw_weight_decay):
  """Adam's bias correction counts the head-only steps, in which the
  backbone's moments stay 0: its first steps after were 3x-6x the LR."""
  config = _config(optimizer='adamw', head_only_epochs=1.0,
                   adamw_weight_decay=adamw_weight_decay)
  with pytest.raises(errors.ConfigError,
                     match=r'optimizer=.adamw.*head_only_epochs=1\.0.*'
                     r'optimizer="sgd" or head_only_epochs=0'):
    optimizers.check_config(config)
  optimizers.check_config(_config(optimizer='adamw', head_only_epochs=0.0))
  optimizers.check_config(_config(optimizer='sgd', head_only_epochs=1.0))


def test_each_optimizer_entry_decides_the_backbone_multiplier():
  """A gradient multiplier is an LR multiplier only for SGD-like updates."""
  for name, entry in optimizers.OPTIMIZERS.items():
    config = _config(optimizer=name, backbone_learning_rate_multiplier=0.1)
    if entry.gradient_scale_invariant:
      with pytest.raises(errors.ConfigError,
                         match='backbone_learning_rate_multiplier=0.1'):
        optimizers.check_config(config)
    else:
      optimizers.check_config(config)


def _config(**overrides):
  config = default_lib.get_config()
  for key, value in overrides.items():
    config[key] = value
  return config


def test_layer_decay_scales_follow_the_stage_index():
  """Stage i of n at d^(n − i); outside the backbone (None) at 1."""
  scales = optimizers.layer_decay_scales(
      {'a/kernel': 'conv1', 'b/kernel': 'conv2', 'c/kernel': 'conv3',
       'head/kernel': None}, ('conv1', 'conv2', 'conv3'), 0.5)
  assert scales == {'a/kernel': 0.25, 'b/kernel': 0.5, 'c/kernel': 1.0,
                    'head/kernel': 1.0}


@pytest.mark.parametrize('value', [0.0, 1.5, -0.5])
def test_bad_layer_decay_is_refused(value):
  with pytest.raises(errors.ConfigError, match=f'layer_decay={value!r}'):
    optimizers.check_config(_config(layer_decay=value))


@pytest.mark.parametrize('name, steps', [('sgd', 2), ('adamw', 1)])
def test_layer_decay_is_a_true_learning_rate_per_variable(name, steps):
  """Each variable's update = scale × its update at scale 1: SGD with
  momentum over 2 steps, AdamW (decoupled decay included) over 1."""
  rng = np.random.default_rng(0)
  initial = {'early': rng.normal(size=(3, 4)), 'late': rng.normal(size=4)}
  gradients = [[rng.normal(size=value.shape) for value in initial.values()]
               for _ in range(steps)]

  def updates(scales):
    optimizer = optimizers.create_optimizer(
        name, 0.1, adamw_weight_decay=0.5, learning_rate_scales=scales)
    variables = [keras.Variable(value.astype(np.float32), name=key)
                 for key, value in initial.items()]
    optimizer.build(variables)
    for step_gradients in gradients:
      optimizer.apply([tf.constant(g, tf.float32) for g in step_gradients],
                      variables)
    return [np.asarray(v) - value.astype(np.float32)
            for v, value in zip(variables, initial.values())]

  base = updates(None)
  scaled = updates({'early': 0.25})
  assert np.abs(base[0]).min() > 1e-4
  np.testing.assert_allclose(scaled[0], 0.25 * base[0], rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(scaled[1], base[1], rtol=1e-6)


def _named_model_variables(strategy, optimizer):
  """Variables of a Conv/BN/Dense model with fixed layer names, 2 steps."""
  with strategy.scope():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6, 6, 3)),
        keras.layers.Conv2D(4, 3, name='conv'),
        keras.layers.BatchNormalization(name='bn', trainable=False),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(5, name='dense'),
    ])
    model.compile(optimizer=optimizer(model), loss=keras.losses.
                  SparseCategoricalCrossentropy(from_logits=True))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(16, 6, 6, 3)).astype(np.float32)
  labels = rng.integers(0, 5, 16)
  model.fit(images, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
  return [np.asarray(v) for v in model.variables]


def test_layer_decay_with_adamw_on_two_replicas_equals_one_device():
  def optimizer(model):
    return optimizers.create_optimizer(
        'adamw', 0.05, adamw_weight_decay=0.5,
        learning_rate_scales={v.path: 0.25 for v in
                              model.get_layer('conv').trainable_variables})

  one = _named_model_variables(tf.distribute.get_strategy(), optimizer)
  two = _named_model_variables(
      tf.distribute.MirroredStrategy(
          ['/cpu:0', '/cpu:1'],
          cross_device_ops=tf.distribute.ReductionToOneDevice()), optimizer)
  for a, b in zip(one, two):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
