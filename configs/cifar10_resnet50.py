r"""Fine-tune ImageNet ResNet50 on CIFAR-10 at 224px.

Command (from the repository root):

    python -m keras_sft.main --config=configs/cifar10_resnet50.py \
        --workdir=workdirs/cifar10_resnet50

Smoke run, CPU, under a minute, no downloads of weights (tfds data still
needed, or tfds mock data in the tests):

    python -m keras_sft.main --config=configs/cifar10_resnet50.py:smoke \
        --workdir=workdirs/smoke

Recipe: SGD momentum 0.9, global batch 128, peak LR 0.01 per 256 images
(0.005 here, scaled linearly), 1 warmup epoch then cosine to 0 over 10
epochs, λ = 5e-5 (an SGD weight decay of 1e-4), CIFAR pad-and-crop becomes
resize-to-256-and-crop-224 plus flips.

Expected result: not yet measured by this project (no GPU or downloads on
its development machines). Published reference points: BiT-M-R50x1
(ImageNet-21k pretrained) fine-tuned on CIFAR-10 reaches 97.2% top-1 (TF2),
big_transfer README; BiT-S R152x4 (ImageNet-1k) 97.51% (Kolesnikov et al.
2020, Table 2). Expect the ImageNet-1k ResNet50 here somewhat below those.
"""

from configs import default as default_lib


def get_config(variant=None):
  """Returns the CIFAR-10 config; `variant='smoke'` for a tiny CPU run."""
  config = default_lib.get_config()
  config.dataset = 'cifar10'
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 224
  config.global_batch_size = 128
  config.num_epochs = 10
  config.learning_rate = 0.01
  config.warmup_epochs = 1.0
  config.weight_decay = 5e-5
  if variant == 'smoke':
    config.image_size = 32
    config.global_batch_size = 8
    config.num_epochs = 2
    config.steps_per_epoch = 2
    config.eval_steps = 2
    config.weights = None
    config.shuffle_buffer_size = 64
    config.checkpoint_every_steps = 1
  elif variant is not None:
    raise ValueError(f'Unknown config variant: {variant!r}. Expected "smoke" '
                     'or nothing.')
  return config
