r"""CIFAR-10 at its native 32px, sized for a CPU: ImageNet ResNet50, 3 epochs.

Command (from the repository root; needs CIFAR-10 prepared for tfds, e.g.
cifar-10-binary.tar.gz in <data_dir>/downloads/manual/, and the ImageNet
no-top weights file in ~/.keras/models/ or via --config.weights=PATH):

    python -m keras_sft.main --config=configs/cifar10_resnet50_cpu.py \
        --workdir=workdirs/cifar10_resnet50_cpu

Recipe: 32px images (CIFAR pad-4-and-crop + flips, no resize), batch 64,
SGD momentum 0.9 at 0.01 per 256 images (0.0025 here), 0.5 warmup epochs
then cosine over 3 epochs, λ = 5e-5, label smoothing 0.1, EMA of the weights
(m = 0.999, about a 1,000-step window, 2,343 steps in all), bfloat16 where
the CPU has AVX512_BF16/AMX (`precision='auto'`; this project measured
ResNet50 training at 32px 1.2x faster in bf16 on such a CPU: 233 vs 197
images/s). Expect about 4-5 minutes per epoch on a 2-core AVX512_BF16 CPU
(50,000 images at ~200 images/s), plus evaluation.

Result: NOT measured. This project's machines have neither CIFAR-10 nor the
ImageNet weights (no network), so this config has never been run to the end
on real data; the speed above is the only measured number. Run the command
above and record top-1 from <workdir>/metrics.json here, with the number of
epochs and the machine, before quoting it. At 32px ResNet50's ImageNet
features are far from their training resolution; expect much lower accuracy
than the 128px BiT-HyperRule config (configs/cifar10_resnet50.py).
"""

from keras_sft import default_config


def get_config():
  """Returns the CPU-sized CIFAR-10 config."""
  config = default_config.get_config()
  config.dataset = 'cifar10'
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 32
  config.global_batch_size = 64
  config.num_epochs = 3
  config.learning_rate = 0.01
  config.learning_rate_batch_size = 256
  config.warmup_epochs = 0.5
  config.weight_decay = 5e-5
  config.label_smoothing = 0.1
  config.ema_momentum = 0.999
  config.precision = 'auto'
  config.checkpoint_every_steps = 200
  return config
