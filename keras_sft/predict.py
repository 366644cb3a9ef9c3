r"""Command line: top-k labels of image files from an exported SavedModel.

    python -m keras_sft.predict --export=workdirs/cifar10_resnet50/export \
        cat.jpg images/

--export is a SavedModel version directory or an export base (its newest
version is used). Folders are searched recursively for .jpg/.jpeg/.png files.
Prints one JSON line per image, in input order:

    {"file": "cat.jpg", "top_k": [{"class_id": 3, "class_name": "cat",
     "probability": 0.91}, ...]}

A file that cannot be read or served (not a JPEG or PNG image, truncated,
too large, missing) gets `{"file": ..., "error": ...}` with a one-line
reason, the other files are still served, and the command exits 1 after
printing all lines. Only TensorFlow is needed
to serve the export: the images go through its `serve_image_bytes` signature.
"""

import json
import os

from absl import flags

from keras_sft import cli
from keras_sft import errors

_EXPORT = flags.DEFINE_string(
    'export', None, 'A SavedModel version directory, or an export base whose '
    'newest integer version is used.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32,
                                   'Images per call of the SavedModel.')
flags.mark_flag_as_required('export')


def image_paths(paths):
  """Expands folders (recursively, sorted) into their JPEG/PNG files.

  Args:
    paths: Files and folders.

  Returns:
    The files, in the given order; each folder's images sorted by path.

  Raises:
    PathNotFoundError: A path does not exist.
  """
  from keras_sft import image_folder  # pylint: disable=g-import-not-at-top
  files = []
  for path in paths:
    if os.path.isdir(path):
      found = [os.path.join(root, name)
               for root, _, names in os.walk(path) for name in names
               if name.lower().endswith(image_folder.IMAGE_EXTENSIONS)]
      files.extend(sorted(found))
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise errors.PathNotFoundError(f'No such file or folder: {path!r}')
  return files


def _records(outputs, files):
  for i, path in enumerate(files):
    yield {'file': path, 'top_k': [
        {'class_id': int(class_id), 'class_name': name.decode(),
         'probability': float(probability)}
        for class_id, name, probability in zip(
            outputs['top_k_class_ids'][i].numpy(),
            outputs['top_k_class_names'][i].numpy(),
            outputs['top_k_probabilities'][i].numpy())]}


def predict_files(signature, files, batch_size=32):
  """Yields one result dict per file, in order (see the module docstring).

  A file that cannot be read or served gets an error record; the other
  files of its batch are still served.

  Args:
    signature: The export's `serve_image_bytes` concrete function.
    files: Image file paths.
    batch_size: Images per call.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1. Received: '
                     f'batch_size={batch_size!r}')
  for start in range(0, len(files), batch_size):
    batch = files[start:start + batch_size]
    records = [None] * len(batch)
    read = []  # (position in batch, contents)
    for i, path in enumerate(batch):
      try:
        with open(path, 'rb') as file:
          read.append((i, file.read()))
      except OSError as error:
        records[i] = {'file': path,
                      'error': f'cannot read the file: {error.strerror}'}
    if read:
      served = _serve(signature, [batch[i] for i, _ in read],
                      [data for _, data in read])
      for (i, _), record in zip(read, served):
        records[i] = record
    yield from records


def _serve(signature, paths, contents):
  """Records of `paths`; one call per file if the batch fails."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from keras_sft import image_folder  # pylint: disable=g-import-not-at-top
  # UnicodeDecodeError: older exports put the raw bytes of a non-image into
  # their error message.
  failures = (tf.errors.OpError, UnicodeDecodeError)
  try:
    return list(_records(signature(image_bytes=tf.constant(contents)), paths))
  except failures:
    pass
  # Some file is bad: one call per file to say which.
  records = []
  for path, data in zip(paths, contents):
    try:
      records.extend(_records(signature(image_bytes=tf.constant([data])),
                              [path]))
    except failures as error:
      records.append({'file': path,
                      'error': image_folder.error_message(error)})
  return records


def main(argv):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from keras_sft import serving as serving_lib  # pylint: disable=g-import-not-at-top
  files = image_paths(argv[1:])
  if not files:
    raise errors.PathNotFoundError(
        'Give image files or folders holding .jpg/.jpeg/.png files. '
        f'Received: {argv[1:]}')
  export_dir = serving_lib.resolve_saved_model(_EXPORT.value)
  try:
    signature = tf.saved_model.load(export_dir).signatures['serve_image_bytes']
  except (OSError, ValueError, KeyError, tf.errors.OpError) as error:
    raise errors.DataError(
        f'{export_dir} is not a keras_sft export: its saved_model.pb does not '
        f'load or has no serve_image_bytes signature ({error}). Export the '
        'run again: python -m keras_sft.export --workdir=WORKDIR') from error
  failed = False
  for record in predict_files(signature, files, _BATCH_SIZE.value):
    failed = failed or 'error' in record
    print(json.dumps(record), flush=True)
  return 1 if failed else 0


def run():
  """Entry point of the `keras-sft-predict` console script."""
  cli.run(main)


if __name__ == '__main__':
  run()
