r"""Command line: export a run as a SavedModel for TF Serving.

    python -m keras_sft.export --workdir=workdirs/cifar10_resnet50

Writes `<workdir>/export/<next version>/` (or under --export_base) from the
run's best checkpoint (`checkpoints/best.weights.h5`, highest val_accuracy),
or its last backup with --checkpoint=last or when the run has no best one.
Prints the path of the new version. Existing versions are never replaced.
The library behind it is `keras_sft.serving`.

Flags are defined when the command runs, not on import, so that this module
and `keras_sft.main` (which defines --workdir too) can share a process.
"""

import warnings

from absl import flags

from keras_sft import cli


def _define_flags():
  flags.DEFINE_string('workdir', None, 'Directory of the run.')
  flags.DEFINE_enum(
      'checkpoint', 'best', ['best', 'last'],
      'best: the epoch with the highest val_accuracy (falls back to the last '
      'backup); last: the newest backup.')
  flags.DEFINE_string('export_base', None,
                      'Where versions go. Default: <workdir>/export.')
  flags.DEFINE_integer(
      'top_k', None, "Classes in the top-k outputs. Default: the run's "
      'config.export_top_k.')
  flags.mark_flag_as_required('workdir')


def main(argv):
  cli.check_no_arguments(argv)
  # Imported here so that `--help` and flag errors do not wait for TF.
  from keras_sft import serving  # pylint: disable=g-import-not-at-top
  values = flags.FLAGS
  _, path = serving.export_run(values.workdir, checkpoint=values.checkpoint,
                               export_base=values.export_base,
                               top_k=values.top_k)
  print(path)


def run():
  """Entry point of `python -m keras_sft.export` and `keras-sft-export`."""
  _define_flags()
  cli.run(main)


def __getattr__(name):
  # keras-sft 0.1 kept the SavedModel library here; it is keras_sft.serving.
  from keras_sft import serving  # pylint: disable=g-import-not-at-top
  if hasattr(serving, name):
    warnings.warn(f'keras_sft.export.{name} moved to keras_sft.serving.{name}'
                  '; the old name goes in the next release.',
                  DeprecationWarning, stacklevel=2)
    return getattr(serving, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


if __name__ == '__main__':
  run()
