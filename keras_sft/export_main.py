r"""Command line: export a finished (or running) run for TF Serving.

    python -m keras_sft.export_main --workdir=workdirs/cifar10_resnet50

Writes `<workdir>/export/<next version>/` (or under --export_base) from the
run's best checkpoint (`checkpoints/best.weights.h5`, highest val_accuracy),
or its last backup with --checkpoint=last or when the run has no best one.
Prints the path of the new version. Existing versions are never replaced.

An entry module of its own: `keras_sft.main` defines `--workdir` too, so the
two must never be imported into one process.
"""

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the run.')
_CHECKPOINT = flags.DEFINE_enum(
    'checkpoint', 'best', ['best', 'last'],
    'best: the epoch with the highest val_accuracy (falls back to the last '
    'backup); last: the newest backup.')
_EXPORT_BASE = flags.DEFINE_string(
    'export_base', None, 'Where versions go. Default: <workdir>/export.')
_TOP_K = flags.DEFINE_integer(
    'top_k', None, 'Classes in the top-k outputs. Default: the run\'s '
    'config.export_top_k.')
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Imported here so that `--help` and flag errors do not wait for TF.
  from keras_sft import export  # pylint: disable=g-import-not-at-top
  _, path = export.export_run(_WORKDIR.value, checkpoint=_CHECKPOINT.value,
                              export_base=_EXPORT_BASE.value,
                              top_k=_TOP_K.value)
  print(path)


def run():
  """Entry point of the `keras-sft-export` console script."""
  app.run(main)


if __name__ == '__main__':
  run()
