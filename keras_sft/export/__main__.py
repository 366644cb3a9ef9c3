r"""Command line: export a run for TF Serving, ONNX Runtime or LiteRT.

    python -m keras_sft.export --workdir=workdirs/cifar10_resnet50
    python -m keras_sft.export --workdir=workdirs/cifar10_resnet50 \
        --format=saved_model,onnx,litert,litert_int8

Writes the next version of each format from the run's last backup with the
weights its final evaluation chose (EMA or raw, BN re-estimated): for a
finished run, the classifier of its own export `export/1`. With
--checkpoint=best, the best epoch's weights (`checkpoints/best.weights.h5`,
highest val_accuracy) instead, a different classifier (the last backup when
the run has no best one). The SavedModel goes to `<workdir>/export/<version>/`
(or under --export_base), the others to `<workdir>/export/<format>/<version>/`.
Prints the path of each new version, one a line, in the order given; on
stderr, which weights each holds (checkpoint, step, EMA or raw, measured
accuracy: also in each format's metadata), and for litert_int8 its accuracy
against the float model on the eval split. Existing versions are never
replaced. The libraries behind it are `keras_sft.export.saved_model` (SavedModel)
and `keras_sft.export.formats` (the others, which need `pip install keras-sft[onnx]` or
`keras-sft[litert]`).

Flags are defined when the command runs, not on import, so that this module
and `keras_sft.main` (which defines --workdir too) can share a process.
"""

from absl import flags

from keras_sft import cli


def _define_flags():
  flags.DEFINE_string('workdir', None, 'Directory of the run.')
  flags.DEFINE_enum(
      'checkpoint', 'last', ['last', 'best'],
      "last: the newest backup with the weights the run's final evaluation "
      "chose, as in the run's own export; best: the epoch with the highest "
      'val_accuracy (falls back to the last backup), a different '
      'classifier.')
  flags.DEFINE_string('export_base', None,
                      'Where versions go. Default: <workdir>/export.')
  flags.DEFINE_integer(
      'top_k', None, "Classes in the top-k outputs. Default: the run's "
      'config.export_top_k.')
  flags.DEFINE_list(
      'format', ['saved_model'],
      'Comma-separated formats to export: saved_model, onnx, litert, '
      'litert_int8.')
  flags.mark_flag_as_required('workdir')


def main(argv):
  cli.check_no_arguments(argv)
  # Imported here so that `--help` and flag errors do not wait for TF.
  import sys  # pylint: disable=g-import-not-at-top
  from keras_sft import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  values = flags.FLAGS
  # Versions are written aside and renamed into place: local folders only.
  # Checked before TensorFlow loads.
  workdir_lib.Workdir(values.workdir)
  if values.export_base is not None:
    workdir_lib.check_local_folder('export_base', values.export_base)
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  from keras_sft.export import formats  # pylint: disable=g-import-not-at-top
  from keras_sft.export import restore  # pylint: disable=g-import-not-at-top
  names = formats.parse_formats(values.format)
  if values.top_k is not None:
    errors.check_positive('top_k', values.top_k)
  for name, _, path, metadata in formats.export_run(
      values.workdir, names, checkpoint=values.checkpoint,
      export_base=values.export_base, top_k=values.top_k):
    print(f'{name}: {restore.describe_source(metadata["source"])}',
          file=sys.stderr)
    quantization = (metadata or {}).get('quantization')
    if quantization:
      print(f'{name}: top-1 accuracy {quantization["int8_accuracy"]:.4f} vs '
            f'{quantization["float_accuracy"]:.4f} float '
            f'({quantization["accuracy_change"]:+.4f}), top-1 agreement '
            f'{quantization["top1_agreement"]:.4f}, on '
            f'{quantization["eval_images"]} eval images', file=sys.stderr)
    print(path, flush=True)


def run():
  """Entry point of `python -m keras_sft.export` and `keras-sft-export`."""
  _define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
