"""keras-sft: supervised fine-tuning of pretrained image classifiers.

Library use, with your own `model.fit`:

    import keras_sft
    train, evaluation, info = keras_sft.input_pipeline.create_datasets(
        'cifar10', image_size=224, global_batch_size=128)
    model = keras_sft.models.create_model(info.num_classes, 224,
                                          weight_decay=5e-5)
    ...

Submodules are imported on first use (`keras_sft.models` loads TensorFlow
then, not `import keras_sft`), so the command lines answer `--help` at once.
"""

import importlib

__version__ = '0.1.0'

# Every submodule, reachable as an attribute of the package.
_SUBMODULES = (
    'batch_augment', 'batch_norm', 'checkpointing', 'classifier', 'cli',
    'default_config', 'depthwise', 'distribution', 'errors', 'evaluation',
    'evaluation_weights', 'export', 'formats', 'hyperrule', 'image_folder',
    'input_pipeline', 'losses', 'models', 'multi_worker', 'optimizers',
    'precise_bn', 'precision', 'predict', 'progress', 'recipe', 'serving',
    'train', 'workdir')
__all__ = list(_SUBMODULES)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(set(globals()) | set(_SUBMODULES))
