"""Mixed precision: choosing the Keras dtype policy and scoping it to a run.

`resolve_policy('auto')` picks 'mixed_bfloat16' where the hardware runs
bfloat16 natively (NVIDIA GPUs of compute capability 8.0 and up; CPUs with
AVX512_BF16 or AMX-BF16), else 'float32' (README "Performance"). The choice
and its reason are logged.

`global_policy(name)` sets Keras' global policy for the layers built inside
it and restores the previous one after, so library callers are not left with
a changed global. Layers keep the policy they were built with.

What stays float32 under a mixed policy: every variable (Keras' mixed
policies keep float32 variables), the backbone's input preprocessing
(`backbones.Preprocessing`) and the classification head (both built with
`dtype='float32'`), the loss and λ·R(θ) (`keras_sft.models.classifier`). Under
'mixed_float16' `Model.compile` wraps the optimizer in a
`keras.optimizers.LossScaleOptimizer`, whose `scale_loss`/`apply` the
classifier's train_step calls: dynamic loss scaling, non-finite steps
skipped (on every replica together when any replica overflows).
"""

import contextlib
import logging

import keras
import tensorflow as tf

from keras_sft import errors

POLICIES = ('float32', 'mixed_bfloat16', 'mixed_float16', 'auto')
# CPU feature flags (Linux /proc/cpuinfo) of native bfloat16 arithmetic.
_CPU_BF16_FLAGS = ('avx512_bf16', 'amx_bf16')


def check_config(config):
  """Checks `config.precision`; looks at no device."""
  errors.check_choice('precision', config.precision, POLICIES)


def cpu_flags(path='/proc/cpuinfo'):
  """Returns the CPU feature flags of the first processor (empty if unknown)."""
  try:
    with open(path) as file:
      for line in file:
        if line.startswith('flags'):
          return set(line.split(':', 1)[1].split())
  except OSError:
    pass
  return set()


def gpu_compute_capabilities():
  """Returns the (major, minor) compute capability of each visible GPU."""
  capabilities = []
  for gpu in tf.config.list_physical_devices('GPU'):
    details = tf.config.experimental.get_device_details(gpu)
    capabilities.append(tuple(details.get('compute_capability', (0, 0))))
  return capabilities


def resolve_policy(name, gpu_capabilities=None, flags=None):
  """Returns the Keras policy name for `name`; resolves and logs 'auto'.

  Args:
    name: One of `POLICIES`.
    gpu_capabilities: For tests: compute capabilities of the GPUs (None:
      detect).
    flags: For tests: CPU feature flags (None: read /proc/cpuinfo).

  Raises:
    ValueError: an unknown `name`.
  """
  errors.check_choice('precision', name, POLICIES)
  if name != 'auto':
    return name
  if gpu_capabilities is None:
    gpu_capabilities = gpu_compute_capabilities()
  if gpu_capabilities:
    if all(capability >= (8, 0) for capability in gpu_capabilities):
      logging.info('precision=auto: mixed_bfloat16 (GPU compute capability '
                   '%s >= 8.0).', gpu_capabilities)
      return 'mixed_bfloat16'
    logging.info('precision=auto: float32 (GPU compute capability %s < 8.0 '
                 'has no fast bfloat16).', gpu_capabilities)
    return 'float32'
  if flags is None:
    flags = cpu_flags()
  found = sorted(set(_CPU_BF16_FLAGS) & set(flags))
  if found:
    logging.info('precision=auto: mixed_bfloat16 (CPU has %s).', found)
    return 'mixed_bfloat16'
  logging.info('precision=auto: float32 (no GPU; CPU lacks %s).',
               _CPU_BF16_FLAGS)
  return 'float32'


@contextlib.contextmanager
def global_policy(name):
  """Sets Keras' global dtype policy inside the block, restores it after."""
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy(name)
  try:
    yield
  finally:
    keras.config.set_dtype_policy(previous)
