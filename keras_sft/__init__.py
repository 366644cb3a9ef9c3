"""keras-sft: supervised fine-tuning of pretrained image classifiers.

Library use, with your own `model.fit` (README "Use it as a library"):

    import keras_sft
    train, evaluation, info = keras_sft.create_datasets(
        'cifar10', image_size=224, global_batch_size=128)
    model = keras_sft.create_model(info.num_classes, 224, weight_decay=5e-5)
    ...

The names below are the public surface: they keep their meaning across
releases. The subpackages (`keras_sft.data`, `.models`, `.training`,
`.export`) are importable for reading and extending, but their modules are
internal: names may move between them. Everything is imported on first use
(`keras_sft.create_model` loads TensorFlow then, not `import keras_sft`), so
the command lines answer `--help` at once.
"""

import importlib

__version__ = '0.2.0'

# Public name: (module, attribute).
_PUBLIC = {
    'train_and_evaluate': ('keras_sft.training.train', 'train_and_evaluate'),
    'evaluate': ('keras_sft.training.train', 'evaluate'),
    'create_datasets': ('keras_sft.data.pipeline', 'create_datasets'),
    'create_model': ('keras_sft.models.network', 'create_model'),
    'create_network': ('keras_sft.models.network', 'create_network'),
    'Classifier': ('keras_sft.models.classifier', 'Classifier'),
    'create_optimizer': ('keras_sft.training.optimizers', 'create_optimizer'),
    'FusedSGD': ('keras_sft.training.optimizers', 'FusedSGD'),
    'create_schedule': ('keras_sft.training.optimizers', 'create_schedule'),
    'scaled_learning_rate': ('keras_sft.training.optimizers',
                             'scaled_learning_rate'),
    'export_saved_model': ('keras_sft.export.saved_model',
                           'export_saved_model'),
    'export_run': ('keras_sft.export.formats', 'export_run'),
    'UserError': ('keras_sft.errors', 'UserError'),
}
# Modules of the public surface: the subpackages, and the default config
# (`keras_sft.default_config.get_config()`, what experiment configs import).
_SUBPACKAGES = ('data', 'models', 'training', 'export', 'default_config')
__all__ = sorted(_PUBLIC) + list(_SUBPACKAGES)


def __getattr__(name):
  if name in _PUBLIC:
    module, attribute = _PUBLIC[name]
    return getattr(importlib.import_module(module), attribute)
  if name in _SUBPACKAGES:
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(set(globals()) | set(__all__))
