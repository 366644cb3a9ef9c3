r"""Command line: fine-tune a pretrained classifier from a config file.

    python -m keras_sft.main --config=configs/cifar10_resnet50.py \
        --workdir=/tmp/cifar10

Any config value can be overridden (`--config.num_epochs=3`); unknown keys are
errors. Rerunning the same command resumes the run in --workdir.
`--mode=evaluate` evaluates the run's newest backup without training.

Flags live only in entry modules (this one, `export`, `predict`); the library
takes `(config, workdir)` or explicit arguments. A mistake in the input ends
with one `error: ...` line (see `keras_sft.cli`).
"""

import os
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from keras_sft import cli
from keras_sft import workdir as workdir_lib

# Configs written for older keras-sft import `configs.default` (the repo's
# configs import `keras_sft.default_config`, found from anywhere); resolve
# those from the directory the command runs in, also when started through
# the console script.
if os.getcwd() not in sys.path:
  sys.path.insert(0, os.getcwd())

_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory of the run: config, checkpoints, '
                               'logs, metrics and export.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/cifar10_resnet50.py[:smoke].',
    lock_config=True)
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'evaluate'],
    'train: train (or resume) then evaluate and export; evaluate: evaluate '
    'the newest backup in --workdir and write the report, without training.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  cli.check_no_arguments(argv)
  # A file or an object-storage URL as --workdir is refused at once, not
  # after the data is read.
  workdir_lib.Workdir(_WORKDIR.value)
  config = cli.loaded_config(_CONFIG)
  # Imported here so that `--help` and flag errors do not wait for TF.
  from keras_sft.training import train  # pylint: disable=g-import-not-at-top
  logging.info('Config:\n%s', config)
  if _MODE.value == 'evaluate':
    train.evaluate(config, _WORKDIR.value)
  else:
    train.train_and_evaluate(config, _WORKDIR.value)


def run():
  """Entry point of the `keras-sft-train` console script."""
  cli.run(main)


if __name__ == '__main__':
  run()
