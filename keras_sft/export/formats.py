"""The export formats, one `Format` entry each, and exporting a run.

`python -m keras_sft.export --format=...` is the command line. Formats:

- `saved_model`: TF Serving's SavedModel (`keras_sft.export.saved_model`), any image
  size, the whole eval preprocessing inside.
- `onnx`: `model.onnx` for ONNX Runtime (opset 17, converted by tf2onnx).
- `litert`: `model.tflite` for LiteRT (`ai_edge_litert`), float32 weights.
- `litert_int8`: `model.tflite` with post-training full-integer quantization
  (int8 weights and activations), calibrated on
  `export_representative_images` images of the run's training data; its
  cost in accuracy is measured on the eval split at export.

Layout: `<export_base>/<format>/<version>/` beside the SavedModel versions
in `<export_base>/<version>/` (TF Serving ignores names that are not
integers), versioned and written atomically by `saved_model.write_version`: an
existing version is never replaced.

Input contract of onnx, litert and litert_int8, one graph input `images`:
uint8 RGB `[N, S, S, 3]` (NHWC, N free) with S = `image_size`; the graph
casts to float32 and applies the backbone's preprocessing itself. It holds
no resize (ONNX Runtime has no kernel for TF's antialiased resize,
`ScaleAndTranslate`), so a client resizes first, as `prepare_images` (and
`python -m keras_sft.predict`) does (`graph.prepare_images`). Outputs:
`logits`, float32 `[N, C]` (also for litert_int8, whose graph dequantizes
its last layer's int8 output), and in the float formats `probabilities`,
float32 `[N, C]`: the softmax of those float32 logits divided by the run's
temperature T (1 without `calibration_split`) in the same graph, as the
SavedModel's (`Format.serves_probabilities`). T is in every format's
metadata (`temperature`, and `calibration`: the split it was fitted on).

Metadata (class names, the input and output, `image_size`, the run and
which of its weights (`source`: checkpoint, step, EMA or raw, their
measured accuracy; `restore.weights_source`), and for litert_int8 the
measured accuracy) is a JSON object: in ONNX `metadata_props` (one entry per
key, each value JSON), for LiteRT in `metadata.json` beside `model.tflite`.
`read_metadata` reads either. The SavedModel has a `metadata.json` too.

Adding a format is one `Format` entry in `FORMATS` (its module gives the
saver, loader and metadata reader) plus its tests.

The optional packages are extras, not in the base install:
`pip install keras-sft[onnx]` (tf2onnx, onnx, onnxruntime) and
`pip install keras-sft[litert]` (ai-edge-litert). Without them the format
fails with one `errors.MissingDependencyError` naming the extra.
"""

import dataclasses
import logging
import os
from typing import Callable, Optional

import ml_collections

from keras_sft.data import pipeline
from keras_sft import errors
from keras_sft.export import graph
from keras_sft.export import litert_format
from keras_sft.export import onnx_format
from keras_sft.export import packages
from keras_sft.export import restore
from keras_sft.export import saved_model
from keras_sft.training import calibration as calibration_lib
from keras_sft.training import checkpoints
from keras_sft.training import precision
from keras_sft import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Format:
  """One export format.

  Attributes:
    name: What `--format` accepts.
    model_file: The model file in each version; None for a directory (the
      SavedModel).
    packages: Python packages needed to write (and check) it.
    runtime_packages: Python packages needed to run it.
    extra: The setup.cfg extra that installs them.
    saver: For converted formats, `saver(module, config, metadata, data)`
      returns `save(directory)`, which writes one version (`module` is a
      `graph.logits_module`); None for the SavedModel, written whole.
    load: `load(path)`: the runtime of a model file, with `logits(images)`.
    read_metadata: `read_metadata(path)`: its metadata dict.
    kind: For formats sharing a model file name, `kind(path)` tells which.
    needs_data: Whether writing it reads the run's data (calibration).
    serves_probabilities: Whether its graph has a `probabilities` output
      (float32 softmax of its logits); not for int8, where TFLite would
      quantize the softmax to 8 bits and its rows would not sum to 1.
  """
  name: str
  model_file: Optional[str] = None
  packages: tuple = ()
  runtime_packages: tuple = ()
  extra: Optional[str] = None
  saver: Optional[Callable] = None
  load: Optional[Callable] = None
  read_metadata: Optional[Callable] = None
  kind: Optional[Callable] = None
  needs_data: bool = False
  serves_probabilities: bool = True


_LITERT = dict(model_file=litert_format.MODEL_FILE,
               packages=litert_format.PACKAGES,
               runtime_packages=litert_format.PACKAGES,
               extra=litert_format.EXTRA, load=litert_format.load,
               read_metadata=litert_format.read_metadata,
               kind=litert_format.kind)
FORMATS = {format.name: format for format in (
    Format('saved_model'),
    Format('onnx', model_file=onnx_format.MODEL_FILE,
           packages=onnx_format.PACKAGES,
           runtime_packages=onnx_format.RUNTIME_PACKAGES,
           extra=onnx_format.EXTRA, saver=onnx_format.saver,
           load=onnx_format.load, read_metadata=onnx_format.read_metadata),
    Format('litert', saver=litert_format.saver, **_LITERT),
    Format('litert_int8', saver=litert_format.int8_saver, needs_data=True,
           serves_probabilities=False, **_LITERT),
)}


# Calibration needs hundreds of images; the draw shuffles through a buffer
# of this many, which tf.data allocates at once.
MAX_REPRESENTATIVE_IMAGES = 100_000


def check_config(config):
  """Checks the format export keys of the config."""
  errors.check_integer(
      'export_representative_images', config.export_representative_images, 1,
      ' (training images that calibrate the litert_int8 export)')
  errors.check_at_most(
      'export_representative_images', config.export_representative_images,
      MAX_REPRESENTATIVE_IMAGES,
      'would be held in memory and shuffled through a buffer allocated at '
      'once, for no better calibration')


def parse_formats(value):
  """`'onnx,litert'` or a list → a tuple of known formats, in order.

  Raises:
    ConfigError: An unknown or repeated format, or none.
  """
  if isinstance(value, str):
    value = value.split(',')
  names = [name.strip() for name in value if name.strip()]
  if not names:
    raise errors.ConfigError(f'Give at least one format of {tuple(FORMATS)}. '
                             f'Received: format={value!r}')
  for name in names:
    errors.check_choice('format', name, tuple(FORMATS))
  if len(set(names)) != len(names):
    raise errors.ConfigError(f'A format is named twice. Received: '
                             f'format={",".join(names)!r}')
  return tuple(names)


def require(format_name, runtime_only=False):
  """Imports the packages of `format_name`; returns them by module name.

  Raises:
    MissingDependencyError: One is not installed; names the extra.
  """
  entry = FORMATS[format_name]
  return packages.require(
      format_name, entry.runtime_packages if runtime_only else entry.packages,
      entry.extra)


def export_format(format_name, model, config, class_names, export_base,
                  source=None, data=None, calibration=None):
  """Writes the next version of one format of a run's model.

  Args:
    format_name: One of `FORMATS`.
    model: The run's Keras model (float32 `[N, S, S, 3]` in [0, 255] →
      logits), e.g. from `restore.restore_run_model`.
    config: The run's ConfigDict.
    class_names: One name per class id.
    export_base: The SavedModel's export base; other formats go to
      `<export_base>/<format>/`.
    source: JSON-able description of where the weights came from.
    data: For formats that read the run's data (`needs_data`), its
      `pipeline.Data`; default `pipeline.from_config(config)`.
    calibration: None (T = 1), or the run's temperature record
      (`calibration.fit_record`): probabilities are softmax(logits / T).

  Returns:
    `(version, path, metadata)`: path is the version directory.
  """
  errors.check_choice('format', format_name, tuple(FORMATS))
  entry = FORMATS[format_name]
  if entry.saver is None:
    version, path = saved_model.export_from_config(
        model, config, class_names, export_base, source=source,
        calibration=calibration)
    return version, path, (saved_model.saved_model_metadata(
        class_names, config.image_size, config.resize_size, source,
        calibration)
                           if source is not None or calibration else None)
  require(format_name)  # Before any conversion work.
  module = graph.logits_module(
      model, config.image_size, entry.serves_probabilities,
      saved_model.calibration_metadata(calibration)['temperature'])
  metadata = graph.metadata(format_name, config, class_names, source,
                            entry.serves_probabilities, calibration)
  save = entry.saver(module, config, metadata, data)
  version, path = saved_model.write_version(
      os.path.join(export_base, format_name), save)
  logging.info('Exported %s version %d to %s.', format_name, version, path)
  return version, path, metadata


def export_run(workdir, formats=('saved_model',),
               checkpoint=restore.DEFAULT_CHECKPOINT, export_base=None,
               top_k=None):
  """Exports the next version of each format of the run in `workdir`.

  The model is restored once (`restore.restore_run_model`); twice for a
  run in mixed precision that exports a SavedModel (computing as the run
  did) and another format (computing in float32).

  Args:
    workdir: A run directory.
    formats: Names of `FORMATS`, or one comma-separated string.
    checkpoint: 'last' (default: the weights of the run's own export) or
      'best'; see `restore.restore_run_model`.
    export_base: The SavedModel's versions go here, the other formats' to
      `<export_base>/<format>/`; default `<workdir>/export`.
    top_k: Classes in the top-k outputs (the SavedModel's signatures; the
      metadata of the others, for predict); default `config.export_top_k`.

  Returns:
    A list of `(format, version, path, metadata)`, in the order given.
  """
  formats = parse_formats(formats)
  for name in formats:
    require(name)  # A missing extra fails before the model is restored.
  base = export_base or workdir_lib.Workdir(workdir).export
  run_config = workdir_lib.Workdir(workdir).read_config()
  # A config.json edited wrongly, or data that is gone, fails before any
  # format is written.
  data = None
  if any(FORMATS[name].needs_data for name in formats):
    check_config(ml_collections.ConfigDict(run_config))
    data = pipeline.from_config(ml_collections.ConfigDict(run_config))
  # The SavedModel computes in the run's precision, as its evaluation did;
  # the other formats in float32 (what converters and runtimes expect, and
  # int8 is calibrated from float32). The run's weights are float32 anyway.
  run_precision = run_config['precision']
  mixed = precision.resolve_policy(run_precision) != 'float32'
  restored = {}
  exported = []
  for name in formats:
    override = 'float32' if mixed and name != 'saved_model' else None
    if override not in restored:
      restored[override] = restore.restore_run_model(workdir, checkpoint,
                                                     precision=override)
    model, config, class_names, weights = restored[override]
    if top_k is not None:
      config.export_top_k = top_k
    step = checkpoints.trained_steps(model)
    source = restore.weights_source(workdir, weights, step)
    _, calibration = calibration_lib.temperature_for_export(workdir, weights,
                                                            step)
    exported.append((name,) + export_format(name, model, config, class_names,
                                            base, source, data, calibration))
  return exported


def resolve_model(path):
  """`(format, model file or SavedModel directory)` of an export path.

  `path` is a model file (`.onnx`, `.tflite`), a version directory of any
  format, or a folder of versions (its newest version is used): the
  SavedModel export base, or `<export base>/<format>`.

  Raises:
    PathNotFoundError: None of these.
  """
  if os.path.isfile(path):
    for entry in _by_model_file():
      if path.endswith(os.path.splitext(entry.model_file)[1]):
        return _kind(entry, path), path
  elif os.path.isdir(path):
    if os.path.exists(os.path.join(path, 'saved_model.pb')):
      return 'saved_model', path
    for entry in _by_model_file():
      file = os.path.join(path, entry.model_file)
      if os.path.isfile(file):
        return _kind(entry, file), file
    versions = saved_model.list_versions(path)
    if versions:
      return resolve_model(os.path.join(path, str(versions[-1])))
  raise errors.PathNotFoundError(
      f'{path!r} is neither a model file (.onnx, .tflite), nor a version '
      'directory of an export, nor a folder of integer versions (such as '
      '<workdir>/export or <workdir>/export/onnx).')


def _by_model_file():
  """One entry per model file name, the first of those sharing one."""
  entries = {}
  for entry in FORMATS.values():
    if entry.model_file:
      entries.setdefault(entry.model_file, entry)
  return list(entries.values())


def _kind(entry, path):
  return entry.kind(path) if entry.kind else entry.name


def check_metadata(runtime, metadata, path, format_name):
  """Raises a DataError unless `metadata` describes the model `runtime`.

  Its `image_size` must be the side of the model's input (a LiteRT model of
  a network that pools globally runs on any size, so a wrong one would
  silently serve wrongly resized images), and it must name one class per
  logit.
  """
  names = metadata.get('class_names')
  size = metadata.get('image_size')
  again = ('Export the run again: python -m keras_sft.export '
           f'--workdir=WORKDIR --format={format_name}')
  if not metadata:
    where = ('its metadata_props' if format_name == 'onnx' else
             f'{litert_format.METADATA_FILE} beside it')
    raise errors.DataError(f'{path} has no keras_sft metadata ({where}). '
                           f'{again}')
  if not isinstance(names, list) or not names:
    raise errors.DataError(f'The metadata of {path} has no class names. '
                           f'{again}')
  temperature = metadata.get('temperature', 1.0)
  if not (errors.is_number(temperature) and 0 < temperature < float('inf')):
    raise errors.DataError(
        f'The metadata of {path} says temperature={temperature!r}; the '
        f'probabilities need a finite temperature > 0. {again}')
  _, height, width, _ = runtime.input_shape
  if (height, width) != (size, size):
    raise errors.DataError(
        f'The metadata of {path} says image_size={size!r}, but the model '
        f'takes {height}x{width} images. {again}')
  if runtime.output_shape[-1] != len(names):
    raise errors.DataError(
        f'The metadata of {path} has {len(names)} class names, but the model '
        f'gives {runtime.output_shape[-1]} logits. {again}')


def read_metadata(format_name, path):
  """The metadata dict of an ONNX or LiteRT model file (see above)."""
  return FORMATS[format_name].read_metadata(path)


def load(format_name, path):
  """The runtime of an ONNX or LiteRT export: an object with `logits` and
  `outputs`."""
  return FORMATS[format_name].load(path)
