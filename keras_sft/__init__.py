"""keras-sft: supervised fine-tuning of pretrained image classifiers.

Library use, with your own `model.fit`:

    import keras_sft
    train, evaluation, info = keras_sft.input_pipeline.create_datasets(
        'cifar10', image_size=224, global_batch_size=128)
    model = keras_sft.models.create_model(info.num_classes, 224,
                                          weight_decay=5e-5)
    ...
"""

from keras_sft import batch_augment
from keras_sft import checkpointing
from keras_sft import classifier
from keras_sft import distribution
from keras_sft import export
from keras_sft import hyperrule
from keras_sft import input_pipeline
from keras_sft import losses
from keras_sft import models
from keras_sft import optimizers
from keras_sft import precision
from keras_sft import train

__version__ = '0.1.0'
