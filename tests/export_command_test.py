"""The serving export: TF Serving layout, both signatures, size, versions."""

import hashlib
import io
import json
import os
import pickle
import resource
import shutil
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import conftest
import image_fixtures
from configs import cifar10_resnet50
from keras_sft.data import augment
from keras_sft.data import pipeline
from keras_sft import errors
from keras_sft.export import formats
from keras_sft.export import restore
from keras_sft.export import saved_model
from keras_sft import files
from keras_sft.models import precise_bn
from keras_sft.training import checkpoints
from keras_sft.training import recipe
from keras_sft import workdir as workdir_lib

# Loads the SavedModel where `import keras_sft` fails and calls both
# signatures, a batch of bad bytes, then a valid batch again.
_SERVE_WITHOUT_KERAS_SFT = r'''
import pickle
import sys
sys.modules['keras_sft'] = None  # Any import of keras_sft now fails.
import numpy as np
import tensorflow as tf
export_dir, inputs_path, outputs_path = sys.argv[1:]
with open(inputs_path, 'rb') as file:
  inputs = pickle.load(file)
loaded = tf.saved_model.load(export_dir)
images = loaded.signatures['serving_default']
image_bytes = loaded.signatures['serve_image_bytes']
def numpy(outputs):
  return {k: v.numpy() for k, v in outputs.items()}
results = {
    'uint8': numpy(images(images=tf.constant(inputs['uint8']))),
    'png': numpy(image_bytes(image_bytes=tf.constant(inputs['png']))),
    'mixed': numpy(image_bytes(image_bytes=tf.constant(inputs['mixed']))),
}
try:
  image_bytes(image_bytes=tf.constant(inputs['bad']))
  results['error'] = None
except Exception as error:  # Reported, not raised: the test checks it.
  results['error'] = (type(error).__name__, str(error))
results['after_error'] = numpy(
    image_bytes(image_bytes=tf.constant(inputs['png'])))
with open(outputs_path, 'wb') as file:
  pickle.dump(results, file)
'''


def _encode(array, image_format, mode=None):
  buffer = io.BytesIO()
  Image.fromarray(array, mode).save(buffer, image_format)
  return buffer.getvalue()


def _in_memory_model(workdir):
  config = cifar10_resnet50.get_config('smoke')
  model = recipe.build_model(config, 10, pretrained=False)
  latest, _ = checkpoints.Checkpointer(
      workdir_lib.Workdir(workdir).checkpoints).latest()
  model.load_weights(latest)
  return model, config.image_size


@pytest.fixture(scope='module')
def model_of_run(smoke_run):
  """The smoke run's final weights in a freshly built model, and its size."""
  return _in_memory_model(smoke_run[0])


def _logits(model_and_size, images):
  model, image_size = model_and_size
  return model(augment.preprocess_for_eval(
      np.asarray(images), image_size), training=False).numpy()


@pytest.fixture(scope='module')
def served(smoke_run, tmp_path_factory):
  """Inputs, and what version 1 served for them in a process without us."""
  workdir, _ = smoke_run
  rng = np.random.default_rng(0)
  # Other sizes than the model's 32px: the export resizes inside.
  uint8 = rng.integers(0, 256, (3, 45, 37, 3)).astype(np.uint8)
  gray = rng.integers(0, 256, (20, 50)).astype(np.uint8)
  rgba = rng.integers(0, 256, (33, 33, 4)).astype(np.uint8)
  rgb = rng.integers(0, 256, (64, 48, 3)).astype(np.uint8)
  png = [_encode(image, 'PNG') for image in uint8]
  inputs = {
      'uint8': uint8,
      'png': png,
      'mixed': [_encode(gray, 'PNG', 'L'), _encode(rgba, 'PNG', 'RGBA'),
                _encode(rgb, 'JPEG')],
      'bad': [png[0], b'<html>not an image</html>', png[1]],
  }
  directory = tmp_path_factory.mktemp('served')
  with open(directory / 'inputs.pkl', 'wb') as file:
    pickle.dump(inputs, file)
  subprocess.run(
      [sys.executable, '-c', _SERVE_WITHOUT_KERAS_SFT,
       conftest.version_dir(workdir), str(directory / 'inputs.pkl'),
       str(directory / 'outputs.pkl')],
      check=True, cwd=str(directory), env=conftest.cli_env(), timeout=300)
  with open(directory / 'outputs.pkl', 'rb') as file:
    outputs = pickle.load(file)
  inputs.update(gray=gray, rgba=rgba, rgb=rgb)
  return inputs, outputs


def test_serving_default_matches_the_in_memory_model(served, model_of_run):
  inputs, outputs = served
  served_uint8 = outputs['uint8']
  logits = _logits(model_of_run, inputs['uint8'])
  np.testing.assert_allclose(served_uint8['logits'], logits, atol=1e-4)
  probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(served_uint8['probabilities'], probabilities,
                             atol=1e-5)
  np.testing.assert_array_equal(served_uint8['class_ids'], logits.argmax(-1))
  # tfds mock data names the CIFAR-10 classes '0'..'9'.
  np.testing.assert_array_equal(served_uint8['class_names'].astype(str),
                                logits.argmax(-1).astype(str))
  # config.export_top_k = 5, most probable first.
  top5 = np.argsort(-probabilities, axis=-1)[:, :5]
  np.testing.assert_array_equal(served_uint8['top_k_class_ids'], top5)
  np.testing.assert_array_equal(
      served_uint8['top_k_class_names'].astype(str), top5.astype(str))
  np.testing.assert_allclose(served_uint8['top_k_probabilities'],
                             np.take_along_axis(probabilities, top5, -1),
                             atol=1e-5)


def test_png_bytes_give_the_uint8_outputs(served):
  _, outputs = served
  for key, value in outputs['uint8'].items():
    if value.dtype.kind in 'SO':
      np.testing.assert_array_equal(outputs['png'][key], value, err_msg=key)
    else:
      np.testing.assert_allclose(outputs['png'][key], value, atol=1e-6,
                                 err_msg=key)


def test_mixed_sizes_grayscale_rgba_and_jpeg_bytes(served, model_of_run):
  inputs, outputs = served
  decoded_jpeg = tf.io.decode_jpeg(inputs['mixed'][2], channels=3).numpy()
  as_rgb = [np.repeat(inputs['gray'][..., None], 3, axis=-1),
            inputs['rgba'][..., :3], decoded_jpeg]
  expected = np.concatenate([_logits(model_of_run, image[None])
                             for image in as_rgb])
  np.testing.assert_allclose(outputs['mixed']['logits'], expected, atol=1e-4)
  assert outputs['mixed']['top_k_class_ids'].shape == (3, 5)


def test_bytes_that_are_not_an_image_fail_the_call_not_the_process(served):
  _, outputs = served
  assert outputs['error'] is not None, 'bad bytes were served'
  error_type, message = outputs['error']
  assert error_type == 'InvalidArgumentError', outputs['error']
  assert 'image_bytes[1] is not a JPEG or PNG image' in message, message
  # The same process serves the next, valid request.
  np.testing.assert_array_equal(outputs['after_error']['logits'],
                                outputs['png']['logits'])


def test_export_stores_each_weight_once_and_no_optimizer_state(
    smoke_run, model_of_run):
  """Variables on disk ≤ 1.05 × the float32 bytes of the model's weights."""
  workdir, _ = smoke_run
  model, _ = model_of_run
  weight_bytes = sum(4 * int(np.prod(v.shape)) for v in model.weights)
  variables_dir = os.path.join(conftest.version_dir(workdir), 'variables')
  stored = sum(os.path.getsize(os.path.join(variables_dir, name))
               for name in os.listdir(variables_dir))
  assert weight_bytes <= stored <= 1.05 * weight_bytes, (stored, weight_bytes)
  # SGD momentum alone would be as large as the trainable weights.
  names = [name for name, _ in tf.train.list_variables(
      os.path.join(variables_dir, 'variables'))]
  assert not [name for name in names if 'optimizer' in name.lower()], names


def _tiny_model():
  inputs = keras.Input((8, 8, 3))
  outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(
      inputs))
  return keras.Model(inputs, outputs)


def test_export_version_takes_the_next_integer_version(tmp_path):
  base = str(tmp_path / 'export')
  os.makedirs(os.path.join(base, '7', 'variables'))
  os.makedirs(os.path.join(base, 'not-a-version'))
  model = _tiny_model()
  version, path = saved_model.export_version(model, base, 8, ['a', 'b', 'c'],
                                             top_k=5)
  assert (version, path) == (8, os.path.join(base, '8'))
  assert os.path.exists(os.path.join(path, 'saved_model.pb'))
  assert saved_model.list_versions(base) == [7, 8]
  # Nothing temporary is left where TF Serving looks.
  assert sorted(os.listdir(base)) == ['7', '8', 'not-a-version']
  # top_k is capped at the number of classes.
  outputs = tf.saved_model.load(path).signatures['serving_default'](
      images=tf.zeros([2, 5, 5, 3], tf.uint8))
  assert outputs['top_k_class_ids'].shape == (2, 3)


def _file_digests(directory):
  digests = {}
  for root, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(root, name), 'rb') as file:
        digests[os.path.relpath(os.path.join(root, name), directory)] = (
            hashlib.sha256(file.read()).hexdigest())
  return digests


def _source(version_directory):
  with open(os.path.join(version_directory, saved_model.METADATA_FILE)) as file:
    return json.load(file)['source']


def test_the_runs_own_export_names_its_weights(smoke_run):
  """export/1's metadata.json: the final step, measured by metrics.json."""
  workdir, _ = smoke_run
  metrics = conftest.read_metrics(workdir)
  source = _source(conftest.version_dir(workdir))
  assert source['checkpoint'] == 'last'
  assert source['step'] == metrics['step'] == metrics['total_steps']
  assert source['accuracy'] == metrics['eval']['accuracy']
  # The final evaluation's weights of the last backup's step.
  assert source['weights'] == checkpoints.FINAL_WEIGHTS
  assert conftest.latest_backup(workdir)[1] == source['step']
  assert source['own_export']


def test_second_export_from_the_workdir_makes_version_2(smoke_run, tmp_path):
  """The export command adds version 2; version 1 stays byte for byte. By
  default it holds the weights of version 1 (the run's own export), and
  says so; the issue found the default was the best epoch's."""
  workdir, _ = smoke_run
  base = tmp_path / 'export'
  shutil.copytree(conftest.version_dir(workdir), base / '1')
  before = _file_digests(base / '1')
  result = subprocess.run(
      [sys.executable, '-m', 'keras_sft.export', f'--workdir={workdir}',
       f'--export_base={base}'],
      capture_output=True, text=True, cwd=conftest.REPO_ROOT,
      env=conftest.cli_env(), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == str(base / '2')
  assert sorted(os.listdir(base)) == ['1', '2']
  assert _file_digests(base / '1') == before
  assert _source(base / '2') == _source(base / '1')
  assert ("saved_model: checkpoint=last: " in result.stderr and
          "the weights of the run's own export" in result.stderr), (
              result.stderr[-3000:])
  # Rebuilt from the last checkpoint, version 2 serves what version 1 does.
  images = tf.constant(np.random.default_rng(1).integers(
      0, 256, (2, 32, 32, 3)).astype(np.uint8))
  version_1, version_2 = (
      tf.saved_model.load(str(base / v)).signatures['serving_default'](
          images=images) for v in ('1', '2'))
  np.testing.assert_allclose(version_2['logits'], version_1['logits'],
                             atol=1e-5)


def _prediction_log_class():
  """PredictionLog as declared in tensorflow_serving/apis (the fields read).

  Built here from the .proto field numbers, independently of the export's
  hand encoding; a map field is wire-compatible with a repeated entry.
  """
  from google.protobuf import descriptor_pb2  # pylint: disable=g-import-not-at-top
  from google.protobuf import descriptor_pool  # pylint: disable=g-import-not-at-top
  from google.protobuf import message_factory  # pylint: disable=g-import-not-at-top
  from tensorflow.core.framework import tensor_pb2  # pylint: disable=g-import-not-at-top
  pool = descriptor_pool.DescriptorPool()
  for dependency in _dependencies(tensor_pb2.DESCRIPTOR):
    pool.AddSerializedFile(dependency.serialized_pb)
  proto = descriptor_pb2.FileDescriptorProto(
      name='warmup_test.proto', package='warmup_test', syntax='proto3',
      dependency=[tensor_pb2.DESCRIPTOR.name])
  field = descriptor_pb2.FieldDescriptorProto
  optional, repeated = field.LABEL_OPTIONAL, field.LABEL_REPEATED

  def message(name, *fields):
    proto.message_type.add(name=name, field=[
        field(name=f, number=n, label=label, type=t, type_name=type_name)
        for f, n, label, t, type_name in fields])

  message('ModelSpec', ('name', 1, optional, field.TYPE_STRING, None),
          ('signature_name', 3, optional, field.TYPE_STRING, None))
  message('InputsEntry', ('key', 1, optional, field.TYPE_STRING, None),
          ('value', 2, optional, field.TYPE_MESSAGE,
           '.tensorflow.TensorProto'))
  message('PredictRequest',
          ('model_spec', 1, optional, field.TYPE_MESSAGE,
           '.warmup_test.ModelSpec'),
          ('inputs', 2, repeated, field.TYPE_MESSAGE,
           '.warmup_test.InputsEntry'))
  message('PredictLog', ('request', 1, optional, field.TYPE_MESSAGE,
                         '.warmup_test.PredictRequest'))
  message('PredictionLog', ('predict_log', 6, optional, field.TYPE_MESSAGE,
                            '.warmup_test.PredictLog'))
  for f in (f for m in proto.message_type for f in m.field):
    if not f.type_name:
      f.ClearField('type_name')
  pool.AddSerializedFile(proto.SerializeToString())
  return message_factory.GetMessageClass(
      pool.FindMessageTypeByName('warmup_test.PredictionLog'))


def _dependencies(file_descriptor, seen=None):
  seen = {} if seen is None else seen
  for dependency in file_descriptor.dependencies:
    _dependencies(dependency, seen)
  seen.setdefault(file_descriptor.name, file_descriptor)
  return list(seen.values())


def test_warmup_requests_replay_on_both_signatures(smoke_run):
  """assets.extra/tf_serving_warmup_requests: one valid request a signature."""
  workdir, _ = smoke_run
  version = conftest.version_dir(workdir)
  prediction_log = _prediction_log_class()
  logs = [prediction_log.FromString(record.numpy()) for record in
          tf.data.TFRecordDataset(os.path.join(
              version, 'assets.extra', 'tf_serving_warmup_requests'))]
  requests = {log.predict_log.request.model_spec.signature_name:
              log.predict_log.request for log in logs}
  assert sorted(requests) == ['serve_image_bytes', 'serving_default']
  loaded = tf.saved_model.load(version)
  for name, request in requests.items():
    inputs = {entry.key: tf.constant(tf.make_ndarray(entry.value))
              for entry in request.inputs}
    outputs = loaded.signatures[name](**inputs)
    assert outputs['probabilities'].shape == (1, 10), name


def _export_dir_version(export_dir):
  """The top-k count a SavedModel at `export_dir` serves: tells versions
  apart."""
  outputs = tf.saved_model.load(export_dir).signatures['serving_default'](
      images=tf.zeros([1, 8, 8, 3], tf.uint8))
  return int(outputs['top_k_class_ids'].shape[-1])


def test_export_saved_model_keeps_the_old_export_when_the_rename_fails(
    tmp_path, monkeypatch):
  """A failure between removing the old and renaming the new loses nothing."""
  export_dir = str(tmp_path / 'model')
  saved_model.export_saved_model(_tiny_model(), export_dir, 8, ['a', 'b', 'c'],
                                 top_k=1)
  real_replace, real_rename = os.replace, os.rename
  failures = []

  def fail_into_target(replace):
    """The first rename into `export_dir` fails; later ones work."""
    def wrapped(source, target, *args, **kwargs):
      if (os.path.abspath(target) == os.path.abspath(export_dir) and
          not failures):
        failures.append(source)
        raise OSError(28, 'No space left on device (simulated)')
      return replace(source, target, *args, **kwargs)
    return wrapped

  monkeypatch.setattr(os, 'replace', fail_into_target(real_replace))
  monkeypatch.setattr(os, 'rename', fail_into_target(real_rename))
  with pytest.raises(OSError, match='simulated'):
    saved_model.export_saved_model(_tiny_model(), export_dir, 8, ['a', 'b', 'c'],
                                   top_k=2)
  monkeypatch.undo()
  assert failures, 'the export never renamed into export_dir'
  # The previous export is still there, complete, and nothing else is left.
  assert _export_dir_version(export_dir) == 1
  assert os.listdir(tmp_path) == ['model']
  # Without the fault, the export is replaced.
  saved_model.export_saved_model(_tiny_model(), export_dir, 8, ['a', 'b', 'c'],
                                 top_k=2)
  assert _export_dir_version(export_dir) == 2
  assert os.listdir(tmp_path) == ['model']


@pytest.fixture(scope='module')
def tiny_export(tmp_path_factory):
  """A SavedModel of a tiny 8px model, and its `serve_image_bytes`."""
  export_dir = str(tmp_path_factory.mktemp('tiny') / 'model')
  saved_model.export_saved_model(_tiny_model(), export_dir, 8, ['a', 'b', 'c'])
  return export_dir, tf.saved_model.load(export_dir).signatures[
      'serve_image_bytes']


def _serve_error(signature, data):
  """The error `serve_image_bytes` raises for `[data]`, or None."""
  try:
    signature(image_bytes=tf.constant([data]))
  except Exception as error:  # pylint: disable=broad-except
    return error
  return None


def test_bytes_that_are_not_utf8_give_a_readable_error(tiny_export):
  _, signature = tiny_export
  error = _serve_error(signature, b'BM\xcf\x00\x01\x02\x03\x04')
  assert isinstance(error, tf.errors.InvalidArgumentError), repr(error)
  message = str(error)
  assert 'image_bytes[0] is not a JPEG or PNG image' in message, message
  # The bytes, hex-encoded.
  assert '42 4d cf 00 01 02 03 04' in message, message


def test_a_decompression_bomb_is_refused_from_its_header(tiny_export):
  """A 16000x16000 PNG of 249 KB: refused before decoding, by default."""
  _, signature = tiny_export
  bomb = image_fixtures.png_bomb(16_000)
  assert len(bomb) < 300_000
  peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.monotonic()
  error = _serve_error(signature, bomb)
  seconds = time.monotonic() - start
  grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
  assert isinstance(error, tf.errors.InvalidArgumentError), repr(error)
  message = str(error)
  assert 'image_bytes[0] is 16000x16000 pixels' in message, message
  assert 'max_image_pixels=40000000' in message, message
  # Decoding it takes seconds and gigabytes (the uint8 RGB image alone is
  # 768 MB).
  assert seconds < 3, seconds
  assert grown < 200 * 1024, f'peak memory grew by {grown} KB'


def test_max_image_pixels_is_set_at_export(tmp_path):
  export_dir = str(tmp_path / 'model')
  saved_model.export_saved_model(_tiny_model(), export_dir, 8, ['a', 'b', 'c'],
                                 max_image_pixels=100)
  signature = tf.saved_model.load(export_dir).signatures['serve_image_bytes']
  square = np.zeros((10, 10, 3), np.uint8)
  for image_format in ('PNG', 'JPEG'):
    # 100 pixels pass; 12 wide by 9 high do not.
    outputs = signature(image_bytes=tf.constant(
        [_encode(square, image_format)]))
    assert outputs['logits'].shape == (1, 3)
    error = _serve_error(signature,
                         _encode(np.zeros((9, 12, 3), np.uint8), image_format))
    assert isinstance(error, tf.errors.InvalidArgumentError), repr(error)
    assert 'image_bytes[0] is 12x9 pixels' in str(error), str(error)
    assert 'max_image_pixels=100' in str(error), str(error)
  with pytest.raises(ValueError, match='max_image_pixels'):
    saved_model.export_saved_model(_tiny_model(), export_dir, 8, ['a'],
                                   max_image_pixels=0)
  config = cifar10_resnet50.get_config('smoke')
  saved_model.check_config(config)
  for value in (0, -1):
    config.max_image_pixels = value
    with pytest.raises(ValueError, match=f'max_image_pixels={value}'):
      saved_model.check_config(config)


def test_versions_are_readable_by_other_users(tmp_path):
  """TF Serving may run as another user: 0755 folders, 0644 files."""
  previous = os.umask(0o022)
  try:
    _, path = saved_model.export_version(_tiny_model(), str(tmp_path / 'export'),
                                         8, ['a', 'b', 'c'])
  finally:
    os.umask(previous)
  modes = {}
  for root, directories, file_names in os.walk(path):
    for name in [root] + [os.path.join(root, d) for d in directories]:
      modes[os.path.relpath(name, path) + '/'] = os.stat(name).st_mode & 0o777
    for name in file_names:
      modes[os.path.relpath(os.path.join(root, name), path)] = (
          os.stat(os.path.join(root, name)).st_mode & 0o777)
  assert 'saved_model.pb' in modes and './' in modes, modes
  wrong = {name: oct(mode) for name, mode in modes.items()
           if mode != (0o755 if name.endswith('/') else 0o644)}
  assert not wrong, wrong


def _age(path, seconds):
  then = time.time() - seconds
  for root, directories, file_names in os.walk(path):
    for name in [root] + [os.path.join(root, n)
                          for n in directories + file_names]:
      os.utime(name, (then, then))


def test_stale_temporary_exports_are_removed_live_ones_kept(tmp_path):
  """What kill -9 during an export leaves is removed by the next export."""
  base = tmp_path / 'export'
  host = socket.gethostname()
  dead = subprocess.Popen(['true'])
  dead.wait()
  names = {
      # A process on this host that died while exporting.
      'dead': f'.tmp-{dead.pid}@{host}.{"a" * 32}',
      # This very process: an export running concurrently in a thread.
      'live': f'.tmp-{os.getpid()}@{host}.{"b" * 32}',
      # Another machine's (shared file system), untouched for 2 hours.
      'other_old': f'.tmp-1@elsewhere.{"c" * 32}',
      # Another machine's, written a minute ago: maybe still running.
      'other_recent': f'.tmp-1@elsewhere.{"d" * 32}',
      # The name of older keras-sft versions (tempfile.mkdtemp).
      'legacy_old': '.tmp-x1y2z3ab',
  }
  for name in names.values():
    (base / name / 'variables').mkdir(parents=True)
    (base / name / 'variables' / 'variables.data-00000-of-00001').write_bytes(
        b'\0' * 1000)
  for key in ('dead', 'live', 'other_old', 'legacy_old'):
    _age(base / names[key], 2 * 3600)
  _age(base / names['other_recent'], 60)
  version, _ = saved_model.export_version(_tiny_model(), str(base), 8,
                                          ['a', 'b', 'c'])
  assert version == 1
  assert sorted(os.listdir(base)) == sorted(
      ['1', names['live'], names['other_recent']])


def test_a_crash_between_the_renames_is_repaired_by_the_next_export(
    tmp_path, monkeypatch):
  """kill -9 after the old export was renamed aside, before the new one in."""
  export_dir = tmp_path / 'model'
  saved_model.export_saved_model(_tiny_model(), str(export_dir), 8,
                                 ['a', 'b', 'c'], top_k=1)
  dead = subprocess.Popen(['true'])
  dead.wait()
  aside = tmp_path / f'.model.old-{dead.pid}@{socket.gethostname()}.{"e" * 32}'
  os.rename(export_dir, aside)

  def fail(*args, **kwargs):
    raise OSError(28, 'No space left on device (simulated)')

  monkeypatch.setattr(saved_model, '_save', fail)
  with pytest.raises(OSError, match='simulated'):
    saved_model.export_saved_model(_tiny_model(), str(export_dir), 8,
                                   ['a', 'b', 'c'], top_k=2)
  # The previous export is back in place; nothing else is left.
  assert _export_dir_version(str(export_dir)) == 1
  assert os.listdir(tmp_path) == ['model']


def _copy_of_run(workdir, tmp_path):
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy,
                  ignore=shutil.ignore_patterns('export', 'tensorboard'))
  return copy


def test_last_falls_back_past_a_damaged_newest_backup(smoke_run, tmp_path):
  """As a resumed run does: the export takes the newest backup that loads."""
  workdir = _copy_of_run(smoke_run[0], tmp_path)
  newest, step = conftest.latest_backup(workdir)
  with open(newest, 'r+b') as file:
    file.truncate(1000)
  _, _, _, path = restore.restore_run_model(workdir, checkpoint='last')
  assert path != newest
  assert os.path.basename(path) == f'ckpt-{step - 1}.weights.h5'


def test_best_is_an_explicit_choice_named_in_its_metadata(smoke_run,
                                                          tmp_path):
  """--checkpoint=best: its step and val_accuracy, and not the run's own
  export, in the metadata and the command's line."""
  workdir, _ = smoke_run
  record = checkpoints.best_record(workdir_lib.Workdir(workdir).checkpoints)
  [(_, _, path, metadata)] = formats.export_run(
      workdir, checkpoint='best', export_base=str(tmp_path / 'export'))
  source = metadata['source']
  assert _source(path) == source
  assert source['checkpoint'] == 'best'
  assert source['step'] == record['step']
  assert source['accuracy'] == record['value']
  assert 'NOT the weights of the run' in restore.describe_source(source)


def test_damaged_best_weights_are_a_user_error(smoke_run, tmp_path):
  workdir = _copy_of_run(smoke_run[0], tmp_path)
  best = os.path.join(workdir_lib.Workdir(workdir).checkpoints,
                      checkpoints.BEST_WEIGHTS)
  with open(best, 'wb') as file:
    file.write(b'not HDF5 at all')
  with pytest.raises(errors.WorkdirError, match='--checkpoint=last'):
    restore.restore_run_model(workdir, checkpoint='best')


def test_last_re_estimates_bn_on_the_batches_training_used(
    smoke_run, tmp_path, mock_cifar10):
  """Whatever the process' random seed: the export's BN statistics are
  those the run computed (its train stream under `config.seed`)."""
  workdir = _copy_of_run(smoke_run[0], tmp_path)
  run = workdir_lib.Workdir(workdir)
  # A run without the final evaluation's weights (unfinished, or older).
  os.remove(os.path.join(run.checkpoints, checkpoints.FINAL_WEIGHTS))
  config = run.read_config()
  config['precise_bn_batches'] = 2
  files.write_json(run.config_file, config)
  keras.utils.set_random_seed(config['seed'] + 1234)
  model, config, _, path = restore.restore_run_model(workdir, 'last')
  exported = [np.array(v) for v in model.non_trainable_weights]
  keras.utils.set_random_seed(config.seed)  # As train._start does.
  batches = pipeline.from_config(config).train(start_step=0).take(2)
  checkpoints.load_weights(model, path)
  precise_bn.reestimate(model, batches)
  for value, variable in zip(exported, model.non_trainable_weights):
    np.testing.assert_allclose(value, np.array(variable), rtol=1e-5,
                               atol=1e-6, err_msg=variable.path)


def test_a_run_older_than_some_config_keys_exports(smoke_run, tmp_path,
                                                   mock_cifar10):
  """config.json without keys added later: rebuilt with their old values."""
  workdir = _copy_of_run(smoke_run[0], tmp_path)
  run = workdir_lib.Workdir(workdir)
  with open(run.config_file) as file:
    stored = json.load(file)
  for key in workdir_lib.KEYS_ADDED_LATER:
    stored.pop(key)
  files.write_json(run.config_file, stored)
  _, config, _, _ = restore.restore_run_model(workdir, 'last')
  for key, value in workdir_lib.KEYS_ADDED_LATER.items():
    assert config[key] == value, key


def test_the_default_export_of_a_precise_bn_run_needs_no_data(
    smoke_run, tmp_path, monkeypatch):
  """--checkpoint=last repeats the run's own export from final.weights.h5:
  the hostile pass found it re-read the training data for precise BN (and
  failed where the data had gone, which README says it never needs)."""
  workdir = _copy_of_run(smoke_run[0], tmp_path)
  run = workdir_lib.Workdir(workdir)
  assert checkpoints.final_record(run.checkpoints) == {
      'step': 4, 'weights': 'raw'}
  config = run.read_config()
  config['precise_bn_batches'] = 2  # Would need the data to re-estimate.
  files.write_json(run.config_file, config)

  def no_data(config):
    raise AssertionError('the export read the training data')

  monkeypatch.setattr(pipeline, 'from_config', no_data)
  [(_, _, path, metadata)] = formats.export_run(
      workdir, export_base=str(tmp_path / 'export'))
  assert metadata['source']['weights'] == checkpoints.FINAL_WEIGHTS
  assert metadata['source']['own_export']
  images = tf.constant(np.random.default_rng(2).integers(
      0, 256, (2, 32, 32, 3)).astype(np.uint8))
  own, again = (tf.saved_model.load(str(p)).signatures['serving_default'](
      images=images)['logits']
                 for p in (conftest.version_dir(smoke_run[0]), path))
  np.testing.assert_allclose(again, own, atol=1e-5)


def test_the_export_command_serves_the_run_s_fitted_temperature(
    smoke_run, tmp_path, monkeypatch):
  """Issue 23: a run's calibration.json (T fitted for its final weights)
  is handed to every format the command exports (what each format does
  with it: export_formats_test). Other weights (best, another step) get
  none: training_calibration_test."""
  from keras_sft.training import calibration  # pylint: disable=g-import-not-at-top
  workdir = _copy_of_run(smoke_run[0], tmp_path)
  step = conftest.read_metrics(workdir)['step']
  record = {'temperature': 3.0, 'split': 'val', 'num_examples': 10,
            'step': step, 'weights': 'raw'}
  calibration.write_record(workdir, record)
  handed = []
  monkeypatch.setattr(
      formats, 'export_format',
      lambda name, *args: handed.append((name, args[-1])) or (1, 'x', {}))
  formats.export_run(workdir, formats='saved_model,litert')
  assert handed == [('saved_model', record), ('litert', record)]
