r"""Command line: top-k labels of image files from an exported SavedModel.

    python -m keras_sft.predict --export=workdirs/cifar10_resnet50/export \
        cat.jpg images/

--export is a SavedModel version directory or an export base (its newest
version is used). Folders are searched recursively for .jpg/.jpeg/.png files.
Prints one JSON line per image, in input order:

    {"file": "cat.jpg", "top_k": [{"class_id": 3, "class_name": "cat",
     "probability": 0.91}, ...]}

A file that is not a JPEG or PNG image gets `{"file": ..., "error": ...}`
and the command exits 1 after printing all lines. Only TensorFlow is needed
to serve the export: the images go through its `serve_image_bytes` signature.
"""

import json
import os
import re

from absl import app
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
  """Yields one result dict per file (see the module docstring).

  Args:
    signature: The export's `serve_image_bytes` concrete function.
    files: Image file paths.
    batch_size: Images per call.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1. Received: '
                     f'batch_size={batch_size!r}')
  for start in range(0, len(files), batch_size):
    batch = files[start:start + batch_size]
    contents = []
    for path in batch:
      with open(path, 'rb') as file:
        contents.append(file.read())
    try:
      yield from _records(signature(image_bytes=tf.constant(contents)), batch)
    except tf.errors.InvalidArgumentError:
      # Some file is not an image: one call per file to say which.
      for path, data in zip(batch, contents):
        try:
          yield from _records(signature(image_bytes=tf.constant([data])),
                              [path])
        except tf.errors.InvalidArgumentError as error:
          yield {'file': path, 'error': _short_message(error.message)}


def _short_message(message):
  """The signature's own message, without TF's graph execution frame."""
  match = re.search(r'assertion failed: \[(.*?)\]\n', message)
  if match:
    return match.group(1).replace('\\"', '"')
  return message.replace('Graph execution error:', '').strip()


def main(argv):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from keras_sft import serving as serving_lib  # pylint: disable=g-import-not-at-top
  files = image_paths(argv[1:])
  if not files:
    raise app.UsageError('Give image files or folders holding .jpg/.jpeg/.png '
                         f'files. Received: {argv[1:]}')
  serving = tf.saved_model.load(
      serving_lib.resolve_saved_model(_EXPORT.value))
  failed = False
  for record in predict_files(serving.signatures['serve_image_bytes'], files,
                              _BATCH_SIZE.value):
    failed = failed or 'error' in record
    print(json.dumps(record), flush=True)
  return 1 if failed else 0


def run():
  """Entry point of the `keras-sft-predict` console script."""
  cli.run(main)


if __name__ == '__main__':
  run()
