r"""Command line: top-k labels of image files from an export of any format.

    python -m keras_sft.predict --model=workdirs/cifar10_resnet50/export \
        cat.jpg images/
    python -m keras_sft.predict \
        --model=workdirs/cifar10_resnet50/export/litert_int8 cat.jpg

--model (or its older name --export) is a SavedModel version directory, an
`.onnx` or `.tflite` file, a version directory of any format, or a folder of
versions whose newest one is used: the SavedModel export base
(`<workdir>/export`) or `<workdir>/export/<format>` (see
`keras_sft.export.formats`). Folders are searched recursively for
.jpg/.jpeg/.png files. Prints one JSON line per image, in input order:

    {"file": "cat.jpg", "top_k": [{"class_id": 3, "class_name": "cat",
     "probability": 0.91}, ...]}

A file that cannot be read or served (not a JPEG or PNG image, truncated,
too large, missing) gets `{"file": ..., "error": ...}` with a one-line
reason, the other files are still served, and the command exits 1 after
printing all lines. A SavedModel serves the images through its
`serve_image_bytes` signature; for ONNX (ONNX Runtime) and LiteRT models,
whose graphs hold no resize, the images are decoded and resized here first,
as the SavedModel does inside (`keras_sft.export.graph.prepare_images`), and
top-k comes from the model's logits and the class names in its metadata. Those formats
need their extra (`pip install keras-sft[onnx]` or `keras-sft[litert]`).
"""

import json
import os

from absl import flags
import numpy as np

from keras_sft import cli
from keras_sft import errors

_MODEL = flags.DEFINE_string(
    'model', None, 'The model: a SavedModel version directory, an .onnx or '
    '.tflite file, a version directory of any format, or a folder of '
    'integer versions (<workdir>/export, <workdir>/export/onnx, ...) whose '
    'newest version is used.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32,
                                   'Images per call of the model.')
flags.mark_flag_as_required('model')


def image_paths(paths):
  """Expands folders (recursively, sorted) into their JPEG/PNG files.

  Args:
    paths: Files and folders.

  Returns:
    The files, in the given order; each folder's images sorted by path. A
    path that is no folder is kept as given, also when it does not exist:
    `predict_files` gives it an error record and serves the others.
  """
  from keras_sft.data import folders  # pylint: disable=g-import-not-at-top
  files = []
  for path in paths:
    if os.path.isdir(path):
      found = [os.path.join(root, name)
               for root, _, names in os.walk(path) for name in names
               if name.lower().endswith(folders.IMAGE_EXTENSIONS)]
      files.extend(sorted(found))
    else:
      files.append(path)
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
  errors.check_integer('batch_size', batch_size, 1, ' (images per call)')
  for start in range(0, len(files), batch_size):
    batch = files[start:start + batch_size]
    records = [None] * len(batch)
    read = []  # (position in batch, contents)
    for i, path in enumerate(batch):
      if os.path.exists(path) and not (os.path.isfile(path) or
                                       os.path.isdir(path)):
        # A pipe or a device: reading it could block or never end.
        records[i] = {'file': path, 'error': 'cannot read the file: not a '
                      'regular file (a pipe, socket or device)'}
        continue
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
  from keras_sft.data import images  # pylint: disable=g-import-not-at-top
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
                      'error': images.error_message(error)})
  return records


class RuntimeSignature:
  """`serve_image_bytes` for an ONNX or LiteRT model (`formats.load`).

  Called as the SavedModel's signature is, with `image_bytes`, and returns
  its top-k outputs: each image is decoded (`images.decode_image`,
  with the same checks and messages) and prepared for the model
  (`graph.prepare_images`) by TensorFlow, then the batch runs in the
  model's runtime.
  """

  def __init__(self, runtime, metadata):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from keras_sft.data import images  # pylint: disable=g-import-not-at-top
    from keras_sft.export import graph  # pylint: disable=g-import-not-at-top
    self._runtime = runtime
    self._class_names = list(metadata['class_names'])
    self._top_k = min(metadata.get('top_k') or 5, len(self._class_names))
    self._temperature = metadata.get('temperature') or 1.0
    max_pixels = metadata.get('max_image_pixels')

    @tf.function(input_signature=[tf.TensorSpec([], tf.string),
                                  tf.TensorSpec([], tf.string)])
    def prepare(contents, name):
      image = images.decode_image(contents, name, max_pixels)
      return graph.prepare_images(image, metadata['image_size'],
                                  metadata.get('resize_size'))

    self._prepare = prepare

  def __call__(self, image_bytes):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    images = np.stack([
        self._prepare(data, f'image_bytes[{index}]').numpy()
        for index, data in enumerate(image_bytes.numpy())])
    # The run's temperature (1 for older exports and uncalibrated runs),
    # as the float graphs' `probabilities` and the SavedModel apply it.
    logits = self._runtime.logits(images).astype(np.float64) / float(
        self._temperature)
    exponentials = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities = exponentials / exponentials.sum(-1, keepdims=True)
    top_ids = np.argsort(-probabilities, axis=-1, kind='stable')[
        :, :self._top_k]
    return {
        'top_k_class_ids': tf.constant(top_ids),
        'top_k_class_names': tf.constant(
            [[self._class_names[i].encode() for i in row] for row in top_ids]),
        'top_k_probabilities': tf.constant(
            np.take_along_axis(probabilities, top_ids, -1).astype(np.float32)),
    }


def load_signature(path):
  """The `serve_image_bytes` of the model at `path` (see --model).

  Raises:
    PathNotFoundError: `path` is no export.
    MissingDependencyError: The format's runtime is not installed.
    DataError: The model does not load, or its metadata does not describe
      it (`formats.check_metadata`).
  """
  from keras_sft.export import formats  # pylint: disable=g-import-not-at-top
  format_name, path = formats.resolve_model(path)
  if format_name != 'saved_model':
    formats.require(format_name, runtime_only=True)
    try:
      runtime = formats.load(format_name, path)
      metadata = formats.read_metadata(format_name, path)
    # ONNX Runtime's errors (InvalidProtobuf, ...) derive from Exception only.
    except Exception as error:  # pylint: disable=broad-except
      raise errors.DataError(
          f'{path} is not a keras_sft {format_name} export: it does not load '
          f'({type(error).__name__}: {error}). Export the run again: python '
          f'-m keras_sft.export --workdir=WORKDIR --format={format_name}'
      ) from error
    formats.check_metadata(runtime, metadata, path, format_name)
    return RuntimeSignature(runtime, metadata)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    return tf.saved_model.load(path).signatures['serve_image_bytes']
  except (OSError, ValueError, KeyError, tf.errors.OpError) as error:
    raise errors.DataError(
        f'{path} is not a keras_sft export: its saved_model.pb does not '
        f'load or has no serve_image_bytes signature ({error}). Export the '
        'run again: python -m keras_sft.export --workdir=WORKDIR') from error


def main(argv):
  files = image_paths(argv[1:])
  if not files:
    raise errors.PathNotFoundError(
        'Give image files or folders holding .jpg/.jpeg/.png files. '
        f'Received: {argv[1:]}')
  signature = load_signature(_MODEL.value)
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
