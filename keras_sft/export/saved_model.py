"""SavedModels for TF Serving, loadable without keras_sft installed.

The `saved_model` entry of `keras_sft.export.formats`; `python -m
keras_sft.export` is the command line.

Layout (what TF Serving watches): `<export_base>/<version>/saved_model.pb`
plus `variables/`, with integer versions. `export_version` writes the next
version into a hidden temporary directory and renames it into place, so TF
Serving never sees a half-written version and no version is ever overwritten.

The SavedModel holds each weight once (Keras' own `model.export` stores every
weight twice, keras-team/keras#23553), no optimizer state, and the whole eval
preprocessing (`augment.preprocess_for_eval`). Two signatures:

- `serving_default(images)`: uint8 RGB images `[N, H, W, 3]` of any size.
- `serve_image_bytes(image_bytes)`: `[N]` encoded JPEG or PNG strings of
  mixed sizes; grayscale and RGBA are converted to RGB. Bytes that are not a
  JPEG or PNG image fail the call with an InvalidArgumentError naming the
  input (`image_bytes[i] is not a JPEG or PNG image ...`), and so does an
  image of more than `max_image_pixels` (from its header, before decoding:
  `image_bytes[i] is WxH pixels ...`).

Both return `logits` `[N, C]`, `probabilities` `[N, C]` (softmax(logits / T),
T the run's fitted temperature, 1 without calibration), `class_ids` `[N]`,
`class_names` `[N]`, and the k most probable classes: `top_k_class_ids`,
`top_k_class_names`, `top_k_probabilities`, each `[N, k]` with
k = min(top_k, C).

Each version also holds `assets.extra/tf_serving_warmup_requests`, one
request per signature, which TF Serving replays when it loads the version.

ONNX and LiteRT exports (`keras_sft.export.formats`) go beside the versions, in
`<export_base>/<format>/<version>/`, written by the same `write_version`.
"""

import errno
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid

import tensorflow as tf

from keras_sft.data import augment
from keras_sft.data import images
from keras_sft import errors
from keras_sft.models import classifier
from keras_sft.training import calibration
# The export's description of itself, beside `saved_model.pb` (TF Serving
# ignores it), as beside a LiteRT `model.tflite`.
METADATA_FILE = 'metadata.json'
# TF Serving's warm-up file, in `<version>/assets.extra/`.
WARMUP_FILE = 'tf_serving_warmup_requests'
_DEFAULT_MAX_IMAGE_PIXELS = images.DEFAULT_MAX_IMAGE_PIXELS
# Temporary export folders are named `<prefix><pid>@<host>.<32 hex digits>`,
# so a later export can tell whether their writer is gone.
_OWNER = re.compile(r'(?P<pid>\d+)@(?P<host>.*)\.[0-9a-f]{32}')
# A temporary folder that no live process on this host owns is removed when
# nothing in it changed for this long (another host's export may still be
# writing it to a shared file system).
_STALE_SECONDS = 3600



class _ServingModule(tf.Module):
  """Tracks the model's variables once and serves it in `tf.function`s."""

  def __init__(self, model, image_size, class_names, top_k,
               max_image_pixels, resize_size, temperature=1.0):
    super().__init__(name='serving')
    # The raw tf.Variables, tracked once. The Keras model itself must not be
    # an attribute: tracking it would store every weight a second time (and
    # a compiled model's optimizer state with it).
    self.model_variables = [variable.value for variable in
                            classifier.serving_variables(model)]
    self._class_names = tf.constant(list(class_names), dtype=tf.string)
    self._image_size = image_size
    self._resize_size = resize_size
    self._top_k = min(top_k, len(class_names))
    self._max_image_pixels = max_image_pixels
    self._temperature = check_temperature(temperature)
    self._call = lambda images: model(images, training=False)

  def _outputs(self, images):
    """Runs the model on float32 `[N, S, S, 3]` images in [0, 255]."""
    logits = tf.cast(self._call(images), tf.float32)
    probabilities = tf.nn.softmax(scaled_logits(logits, self._temperature),
                                  axis=-1)
    class_ids = tf.argmax(logits, axis=-1, output_type=tf.int64)
    top_k = tf.math.top_k(probabilities, k=self._top_k)
    top_k_ids = tf.cast(top_k.indices, tf.int64)
    return {
        'logits': logits,
        'probabilities': probabilities,
        'class_ids': class_ids,
        'class_names': tf.gather(self._class_names, class_ids),
        'top_k_class_ids': top_k_ids,
        'top_k_class_names': tf.gather(self._class_names, top_k_ids),
        'top_k_probabilities': top_k.values,
    }

  @tf.function(input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.uint8, name='images')])
  def serve_images(self, images):
    return self._outputs(
        augment.preprocess_for_eval(images, self._image_size,
                                    self._resize_size))

  @tf.function(input_signature=[
      tf.TensorSpec([None], tf.string, name='image_bytes')])
  def serve_image_bytes(self, image_bytes):
    indices = tf.range(tf.shape(image_bytes, out_type=tf.int64)[0])
    images = tf.map_fn(
        self._decode, (image_bytes, indices),
        fn_output_signature=tf.TensorSpec(
            [self._image_size, self._image_size, 3], tf.float32))
    return self._outputs(images)

  def _decode(self, element):
    """One encoded image → `[S, S, 3]` float32, as the eval pipeline does."""
    data, index = element
    name = tf.strings.join(['image_bytes[', tf.strings.as_string(index), ']'])
    image = images.decode_image(data, name, self._max_image_pixels)
    return augment.preprocess_for_eval(image, self._image_size,
                                       self._resize_size)


def check_temperature(temperature):
  """`temperature` as a float; raises ConfigError unless it is a T the fit
  can return, in [MIN_TEMPERATURE, MAX_TEMPERATURE] (calibration): a
  positive T far below would make float32 logits / T overflow (1e-300 is 0
  in float32) and every `probabilities` NaN."""
  errors.check_positive('temperature', temperature)
  if not (calibration.MIN_TEMPERATURE * (1 - 1e-9) <= temperature <=
          calibration.MAX_TEMPERATURE * (1 + 1e-9)):
    raise errors.ConfigError(
        f'temperature must be in [{calibration.MIN_TEMPERATURE:g}, '
        f'{calibration.MAX_TEMPERATURE:g}], the range temperature scaling '
        f'fits it in. Received: temperature={temperature!r}')
  return float(temperature)


def scaled_logits(logits, temperature):
  """`logits / temperature`; `logits` itself (no op) for T = 1, so an
  uncalibrated export's graph is the one exported before calibration."""
  if temperature == 1.0:
    return logits
  return logits / tf.constant(temperature, logits.dtype)


def calibration_metadata(calibration):
  """The `temperature` and `calibration` keys of every export's metadata.

  Args:
    calibration: None, or the record of `calibration.fit_record` (T, the
      split it was fitted on, its size, the weights' step, NLL and ECE there).
  """
  return {'temperature': float(calibration['temperature'])
                         if calibration else 1.0,
          'calibration': calibration}


def _varint(value):
  encoded = bytearray()
  while True:
    byte, value = value & 0x7f, value >> 7
    encoded.append(byte | (0x80 if value else 0))
    if not value:
      return bytes(encoded)


def _field(number, payload):
  """A length-delimited protobuf field (wire type 2)."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def warmup_record(signature_name, input_name, value):
  """A serialized `tensorflow.serving.PredictionLog` with one PredictRequest.

  Encoded by hand (field numbers of tensorflow_serving/apis/*.proto:
  PredictionLog.predict_log = 6, PredictLog.request = 1,
  PredictRequest.model_spec = 1 and .inputs = 2, ModelSpec.signature_name =
  3), so the export needs no tensorflow-serving-api package.
  """
  tensor = tf.make_tensor_proto(value).SerializeToString()
  inputs_entry = _field(1, input_name.encode()) + _field(2, tensor)
  request = (_field(1, _field(3, signature_name.encode())) +
             _field(2, inputs_entry))
  return _field(6, _field(1, request))


def _write_warmup_requests(export_dir, image_size):
  """TF Serving replays these at load, so the first real request is fast."""
  directory = os.path.join(export_dir, 'assets.extra')
  os.makedirs(directory, exist_ok=True)
  image = tf.zeros([image_size, image_size, 3], tf.uint8)
  with tf.io.TFRecordWriter(
      os.path.join(directory, WARMUP_FILE)) as writer:
    writer.write(warmup_record('serving_default', 'images', image[None]))
    writer.write(warmup_record('serve_image_bytes', 'image_bytes',
                               [tf.io.encode_png(image).numpy()]))


def check_config(config):
  """Checks the export keys of the config."""
  errors.check_positive('export_top_k', config.export_top_k)
  _check_max_image_pixels(config.max_image_pixels)


# A 65,535 x 65,535 JPEG (the format's largest) is about this many pixels;
# decoded as RGB it takes 12 GiB. Larger values also overflow the int64
# arithmetic of the header check.
MAX_IMAGE_PIXELS = 2**32


def _check_max_image_pixels(value):
  errors.check_integer('max_image_pixels', value, 1,
                       ' (width x height of the largest image decoded)')
  errors.check_at_most('max_image_pixels', value, MAX_IMAGE_PIXELS,
                       'admit images no machine can decode')


def _save(model, export_dir, image_size, class_names, top_k,
          max_image_pixels, resize_size, metadata=None, temperature=1.0):
  if not class_names:
    raise errors.ConfigError(f'class_names must not be empty. Received: '
                             f'class_names={class_names!r}')
  errors.check_positive('top_k', top_k)
  _check_max_image_pixels(max_image_pixels)
  module = _ServingModule(model, image_size, class_names, top_k,
                          max_image_pixels, resize_size, temperature)
  tf.saved_model.save(
      module, export_dir,
      signatures={
          'serving_default': module.serve_images,
          'serve_image_bytes': module.serve_image_bytes,
      })
  _write_warmup_requests(export_dir, image_size)
  if metadata is not None:
    with open(os.path.join(export_dir, METADATA_FILE), 'w') as file:
      json.dump(metadata, file, indent=2)


def _make_readable(directory):
  """0755 folders and 0644 files: TF Serving may run as another user.

  The temporary folder is created 0700, and a umask may have hidden the
  files too.
  """
  os.chmod(directory, 0o755)
  for root, directories, files in os.walk(directory):
    for name in directories:
      os.chmod(os.path.join(root, name), 0o755)
    for name in files:
      os.chmod(os.path.join(root, name), 0o644)


def export_saved_model(model, export_dir, image_size, class_names, top_k=5,
                       max_image_pixels=_DEFAULT_MAX_IMAGE_PIXELS,
                       resize_size=None, temperature=1.0):
  """Writes a SavedModel of `model` to `export_dir` (no version directory).

  Use `export_version` for the layout TF Serving watches.

  The SavedModel is written to a hidden temporary directory beside
  `export_dir` and renamed into place. An existing `export_dir` is first
  renamed aside (to `.<name>.old-*` beside it), and removed only after the
  new one is in place; if renaming the new one in fails, the old one is
  renamed back. So a failure leaves the previous export at `export_dir`, and
  a crash (kill -9) between the two renames leaves it at `.<name>.old-*`
  (the next call renames it back before anything else): a complete
  SavedModel always exists at one of the two. Temporary folders of exports
  that were killed are removed by the next call (see `_stale`).

  Args:
    model: A Keras model mapping float32 `[N, S, S, 3]` images in [0, 255] to
      logits.
    export_dir: Output directory; replaced if it exists (see above).
    image_size: S, the side the model expects.
    class_names: One name per class id.
    top_k: How many of the most probable classes the signatures return.
    max_image_pixels: `serve_image_bytes` refuses an image with more pixels
      (width x height, read from its header) without decoding it.
    resize_size: The run's training `resize_size` (BiT-HyperRule), which
      changes the eval preprocessing; see `augment.preprocess_for_eval`.
    temperature: T > 0: `probabilities` are softmax(logits / T).

  Returns:
    `export_dir`.
  """
  export_dir = os.path.abspath(export_dir)
  parent, name = os.path.split(export_dir)
  os.makedirs(parent, exist_ok=True)
  if not os.path.lexists(export_dir):
    # A crash between the two renames below left the previous export aside.
    for aside in _stale(parent, f'.{name}.old-')[:1]:
      os.rename(aside, export_dir)
  for prefix in (f'.{name}.tmp-', f'.{name}.old-'):
    _remove_stale(parent, prefix)
  temporary = _temporary_name(parent, f'.{name}.tmp-')
  os.mkdir(temporary, 0o700)
  try:
    _save(model, temporary, image_size, class_names, top_k,
          max_image_pixels, resize_size, temperature=temperature)
    _make_readable(temporary)
    aside = None
    if os.path.lexists(export_dir):
      aside = _temporary_name(parent, f'.{name}.old-')
      os.rename(export_dir, aside)
    try:
      os.rename(temporary, export_dir)
    except BaseException:
      if aside:
        os.rename(aside, export_dir)
      raise
  except BaseException:
    shutil.rmtree(temporary, ignore_errors=True)
    raise
  if aside:
    shutil.rmtree(aside, ignore_errors=True)
  logging.info('Exported a SavedModel to %s.', export_dir)
  return export_dir


def _temporary_name(directory, prefix):
  """A new hidden path in `directory` that names this process and host."""
  return os.path.join(directory, f'{prefix}{os.getpid()}@'
                      f'{socket.gethostname()}.{uuid.uuid4().hex}')


def _is_running(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's process.
    return True
  return True


def _last_change(path):
  """The newest modification time of `path` and everything under it."""
  newest = os.lstat(path).st_mtime
  for root, directories, files in os.walk(path):
    for name in directories + files:
      try:
        newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
      except OSError:
        pass
  return newest


def _stale(directory, prefix):
  """The `<prefix>*` folders of exports killed mid-way (kill -9, power loss).

  A folder whose owner is a process of this host that no longer runs is
  stale; one of another host, or of an older naming scheme, once nothing in
  it changed for `_STALE_SECONDS`. An export running concurrently keeps its
  folder.
  """
  found = []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if not name.startswith(prefix) or not os.path.isdir(path):
      continue
    owner = _OWNER.fullmatch(name[len(prefix):])
    try:
      if owner and owner.group('host') == socket.gethostname():
        stale = not _is_running(int(owner.group('pid')))
      else:
        stale = time.time() - _last_change(path) > _STALE_SECONDS
    except OSError:  # Removed meanwhile by another export.
      continue
    if stale:
      found.append(path)
  return found


def _remove_stale(directory, prefix):
  for path in _stale(directory, prefix):
    logging.info('Removing %s, left by an export that did not finish.', path)
    shutil.rmtree(path, ignore_errors=True)


def list_versions(export_base):
  """Returns the sorted integer versions under `export_base` ([] if none)."""
  if not os.path.isdir(export_base):
    return []
  return sorted(
      int(name) for name in os.listdir(export_base)
      if name.isdigit() and os.path.isdir(os.path.join(export_base, name)))


def resolve_saved_model(path):
  """A SavedModel directory, or the newest version of an export base.

  Raises:
    PathNotFoundError: `path` is neither.
  """
  if os.path.exists(os.path.join(path, 'saved_model.pb')):
    return path
  versions = list_versions(path)
  if not versions:
    raise errors.PathNotFoundError(
        f'{path!r} is neither a SavedModel directory nor a folder of integer '
        'versions (an export base such as <workdir>/export).')
  return os.path.join(path, str(versions[-1]))


def export_version(model, export_base, image_size, class_names, top_k=5,
                   max_image_pixels=_DEFAULT_MAX_IMAGE_PIXELS,
                   resize_size=None, source=None, calibration=None):
  """Writes `<export_base>/<next version>/`, the layout TF Serving loads.

  The version is one more than the largest there (1 for the first). The
  SavedModel is written to a hidden temporary directory (TF Serving ignores
  names that are not integers) and renamed into place; an existing version
  is never replaced. Temporary directories of exports that were killed
  (`.tmp-<pid>@<host>.*`) are removed first, those of a running export kept
  (see `_stale`).

  Args:
    model: A Keras model mapping float32 `[N, S, S, 3]` images in [0, 255] to
      logits.
    export_base: The directory TF Serving's `--model_base_path` points at.
    image_size: S, the side the model expects.
    class_names: One name per class id.
    top_k: How many of the most probable classes the signatures return.
    max_image_pixels: `serve_image_bytes` refuses an image with more pixels
      (width x height, read from its header) without decoding it.
    resize_size: As in `export_saved_model`.
    source: None, or which weights these are (`weights_source`): written
      with the class names and image size to `metadata.json` in the version.
    calibration: None (T = 1), or the run's temperature record
      (`calibration.fit_record`): `probabilities` are softmax(logits / T),
      and the record goes into `metadata.json`.

  Returns:
    `(version, path)` of the new version.
  """
  metadata = None
  if source is not None or calibration is not None:
    metadata = saved_model_metadata(class_names, image_size, resize_size,
                                    source, calibration)
  temperature = calibration_metadata(calibration)['temperature']
  version, path = write_version(
      export_base, lambda directory: _save(
          model, directory, image_size, class_names, top_k, max_image_pixels,
          resize_size, metadata, temperature))
  logging.info('Exported SavedModel version %d to %s.', version, path)
  return version, path


def saved_model_metadata(class_names, image_size, resize_size, source,
                         calibration=None):
  """The SavedModel's `metadata.json`: what the other formats' holds that
  is not in its signatures, which weights it holds (`source`) and the
  temperature of its probabilities (`calibration_metadata`)."""
  return {'format': 'saved_model', 'class_names': list(class_names),
          'image_size': image_size, 'resize_size': resize_size,
          'source': source, **calibration_metadata(calibration)}


def write_version(export_base, save):
  """Writes `<export_base>/<next version>/` with `save(directory)`.

  The version is one more than the largest there (1 for the first).
  `save` writes into a hidden temporary directory (serving systems ignore
  names that are not integers), which is made readable to all (0755/0644)
  and renamed into place; an existing version is never replaced, also when
  another writer takes the same version meanwhile. Temporary directories of
  writers that were killed (`.tmp-<pid>@<host>.*`) are removed first, those
  of a running one kept (see `_stale`). Every export format
  (`keras_sft.export.formats`) is versioned this way.

  Args:
    export_base: The directory of the versions.
    save: Called with the (empty, existing) directory to write.

  Returns:
    `(version, path)` of the new version.
  """
  os.makedirs(export_base, exist_ok=True)
  _remove_stale(export_base, '.tmp-')
  temporary = _temporary_name(export_base, '.tmp-')
  os.mkdir(temporary, 0o700)
  try:
    save(temporary)
    _make_readable(temporary)
    while True:
      version = (list_versions(export_base) or [0])[-1] + 1
      path = os.path.join(export_base, str(version))
      try:
        # Fails if another writer took this version meanwhile; then retry.
        os.rename(temporary, path)
        break
      except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
          raise
  except BaseException:
    shutil.rmtree(temporary, ignore_errors=True)
    raise
  return version, path


def export_from_config(model, config, class_names, export_base, top_k=None,
                       source=None, calibration=None):
  """`export_version` with the run's serving keys: the one place they are read.

  Args:
    model: As in `export_version`.
    config: The run's ConfigDict (`image_size`, `export_top_k`,
      `max_image_pixels`, `resize_size`).
    class_names: One name per class id.
    export_base: Where versions go.
    top_k: Overrides `config.export_top_k` when not None.
    source: None, or which weights of the run these are
      (`restore.weights_source`), written to the version's metadata.json.
    calibration: None, or the run's temperature record (`export_version`).

  Returns:
    `(version, path)` of the new version.
  """
  return export_version(
      model, export_base, config.image_size, class_names,
      top_k=config.export_top_k if top_k is None else top_k,
      max_image_pixels=config.max_image_pixels,
      resize_size=config.resize_size, source=source, calibration=calibration)
