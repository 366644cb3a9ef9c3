"""ONNX and LiteRT exports: their runtimes alone give the SavedModel's logits.

A small CNN (the run's preprocessing layer, fused BatchNormalization, Conv,
Dense) is trained in seconds on colored squares, so the int8 model has
non-trivial predictions to agree with; the ResNet50 of a real run goes
through the export command once, on the smoke run.
"""

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import conftest
from configs import default as default_lib
from keras_sft import errors
from keras_sft.export import formats
from keras_sft.export import graph
from keras_sft.export import litert_format
from keras_sft.export import onnx_format
from keras_sft.export import saved_model
from keras_sft import files
from keras_sft.models import backbones
from keras_sft.models import batch_norm
from keras_sft import predict
from keras_sft.training import precision
from keras_sft import workdir as workdir_lib

_CLASSES = ('blue', 'green', 'red')  # Sorted: the folder's class ids.
_COLORS = {'red': (230, 40, 40), 'green': (40, 200, 60), 'blue': (50, 60, 230)}
_SIDE = 32
_COUNTS = {'train': 24, 'test': 20}
# Float formats: max |Δ logits| ≤ this × max |SavedModel logits|.
_FLOAT_RELATIVE_TOLERANCE = 1e-4
_INT8_MIN_AGREEMENT = 0.95

# Runs each format in its runtime where TensorFlow, Keras and keras_sft
# cannot be imported; writes logits and metadata per format.
_BLOCK_TENSORFLOW = r'''
import importlib.abc
import sys

_BLOCKED = ('tensorflow', 'keras', 'keras_sft', 'tf_keras', 'tf2onnx')


class _Blocker(importlib.abc.MetaPathFinder):

  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in _BLOCKED:
      raise ImportError(f'{name} is blocked in this process')
    return None


sys.meta_path.insert(0, _Blocker())
for name in list(sys.modules):
  if name.split('.')[0] in _BLOCKED:
    del sys.modules[name]
'''

_RUN_WITHOUT_TENSORFLOW = _BLOCK_TENSORFLOW + r'''
import json
import os
import pickle

import numpy as np
import onnxruntime
from ai_edge_litert import interpreter as litert

models_path, inputs_path, outputs_path = sys.argv[1:]
with open(models_path) as file:
  paths = json.load(file)
with open(inputs_path, 'rb') as file:
  images = pickle.load(file)
results = {}
for name, path in paths.items():
  if name == 'onnx':
    session = onnxruntime.InferenceSession(
        path, providers=['CPUExecutionProvider'])
    metadata = {key: json.loads(value) for key, value in
                session.get_modelmeta().custom_metadata_map.items()}
    logits = session.run(['logits'], {'images': images})[0]
  else:
    with open(os.path.join(os.path.dirname(path), 'metadata.json')) as file:
      metadata = json.load(file)
    model = litert.Interpreter(model_path=path)
    model_input = model.get_input_details()[0]
    model.resize_tensor_input(model_input['index'], list(images.shape))
    model.allocate_tensors()
    model.set_tensor(model_input['index'], images)
    model.invoke()
    logits = model.get_tensor(model.get_output_details()[0]['index'])
    metadata['input_dtype'] = np.dtype(model_input['dtype']).name
    metadata['input_quantization'] = tuple(model_input['quantization'])
  results[name] = {'logits': np.array(logits), 'metadata': metadata}
try:
  import tensorflow  # pylint: disable=unused-import
  results['tensorflow_importable'] = True
except ImportError:
  results['tensorflow_importable'] = False
results['imported'] = sorted(
    name for name in sys.modules if name.split('.')[0] in _BLOCKED)
with open(outputs_path, 'wb') as file:
  pickle.dump(results, file)
'''


def _square_image(rng, color):
  """Gray noise with one colored square of random size and place."""
  image = rng.integers(60, 180, (_SIDE, _SIDE, 3))
  side = rng.integers(12, 22)
  top, left = rng.integers(0, _SIDE - side, 2)
  square = np.asarray(color) + rng.integers(-25, 26, (side, side, 3))
  image[top:top + side, left:left + side] = square
  return np.clip(image, 0, 255).astype(np.uint8)


def _write_squares(root):
  """`root/<split>/<class>/*.png`; returns the test images and labels."""
  rng = np.random.default_rng(0)
  test_images, test_labels = [], []
  for split, count in _COUNTS.items():
    for label, name in enumerate(_CLASSES):
      os.makedirs(os.path.join(root, split, name))
      for i in range(count):
        image = _square_image(rng, _COLORS[name])
        Image.fromarray(image).save(os.path.join(root, split, name,
                                                 f'{i}.png'))
        if split == 'test':
          test_images.append(image)
          test_labels.append(label)
  return np.stack(test_images), np.array(test_labels)


def _small_model():
  inputs = keras.Input((_SIDE, _SIDE, 3))
  features = backbones.Preprocessing('caffe')(inputs)
  for filters in (8, 16):
    features = keras.layers.Conv2D(filters, 3, strides=2, padding='same')(
        features)
    features = keras.layers.BatchNormalization()(features)
    features = keras.layers.ReLU()(features)
  features = keras.layers.GlobalAveragePooling2D()(features)
  outputs = keras.layers.Dense(len(_CLASSES))(features)
  return batch_norm.fuse(keras.Model(inputs, outputs))


def _train_images(root):
  images, labels = [], []
  for label, name in enumerate(_CLASSES):
    directory = os.path.join(root, 'train', name)
    for file in sorted(os.listdir(directory)):
      images.append(np.asarray(Image.open(os.path.join(directory, file))))
      labels.append(label)
  return np.stack(images).astype(np.float32), np.array(labels)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """Every format of a small trained model, and the squares' test split."""
  root = str(tmp_path_factory.mktemp('squares'))
  test_images, test_labels = _write_squares(root)
  keras.utils.set_random_seed(0)
  model = _small_model()
  model.compile(optimizer=keras.optimizers.Adam(0.01),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
  model.fit(*_train_images(root), batch_size=8, epochs=12, verbose=0,
            shuffle=True)
  config = default_lib.get_config()
  config.dataset = f'folder:{root}'
  config.image_size = _SIDE
  config.global_batch_size = 8
  config.export_representative_images = 16
  base = str(tmp_path_factory.mktemp('export'))
  paths, metadata = {}, {}
  for name in formats.FORMATS:
    _, paths[name], metadata[name] = formats.export_format(
        name, model, config, list(_CLASSES), base, source={'test': True})
  return dict(model=model, config=config, base=base, paths=paths,
              metadata=metadata, images=test_images, labels=test_labels)


def _saved_model_logits(path, images):
  loaded = tf.saved_model.load(path)
  return loaded.signatures['serving_default'](
      images=tf.constant(images))['logits'].numpy()


@pytest.fixture(scope='module')
def without_tensorflow(exported, tmp_path_factory):
  """What each runtime gives in a process that cannot import TensorFlow."""
  directory = tmp_path_factory.mktemp('runtimes')
  rng = np.random.default_rng(1)
  images = np.concatenate([exported['images'], rng.integers(
      0, 256, (4, _SIDE, _SIDE, 3)).astype(np.uint8)])
  model_files = {name: os.path.join(exported['paths'][name],
                                    formats.FORMATS[name].model_file)
                 for name in ('onnx', 'litert', 'litert_int8')}
  (directory / 'backbones.json').write_text(json.dumps(model_files))
  with open(directory / 'inputs.pkl', 'wb') as file:
    pickle.dump(images, file)
  result = subprocess.run(
      [sys.executable, '-c', _RUN_WITHOUT_TENSORFLOW,
       str(directory / 'backbones.json'), str(directory / 'inputs.pkl'),
       str(directory / 'outputs.pkl')],
      capture_output=True, text=True, cwd=str(directory),
      env=conftest.cli_env(), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(directory / 'outputs.pkl', 'rb') as file:
    outputs = pickle.load(file)
  reference = _saved_model_logits(exported['paths']['saved_model'], images)
  return images, reference, outputs


def test_the_runtimes_ran_without_tensorflow_keras_or_keras_sft(
    without_tensorflow):
  _, _, outputs = without_tensorflow
  assert outputs['imported'] == []
  assert outputs['tensorflow_importable'] is False


@pytest.mark.parametrize('name', ['onnx', 'litert'])
def test_float_formats_give_the_saved_model_logits(without_tensorflow, name):
  _, reference, outputs = without_tensorflow
  logits = outputs[name]['logits']
  assert logits.shape == reference.shape and logits.dtype == np.float32
  scale = np.abs(reference).max()
  assert np.abs(logits - reference).max() <= (
      _FLOAT_RELATIVE_TOLERANCE * scale), (np.abs(logits - reference).max(),
                                           scale)


def test_int8_agrees_with_the_saved_model_on_the_eval_split(
    exported, without_tensorflow):
  _, reference, outputs = without_tensorflow
  count = len(exported['labels'])
  float_top1 = reference[:count].argmax(-1)
  int8_top1 = outputs['litert_int8']['logits'][:count].argmax(-1)
  # A model with something to agree on: accurate, every class predicted.
  assert (float_top1 == exported['labels']).mean() >= 0.9
  assert sorted(set(float_top1)) == [0, 1, 2]
  agreement = (int8_top1 == float_top1).mean()
  assert agreement >= _INT8_MIN_AGREEMENT, agreement
  # uint8 pixels in, float32 logits out, as the float formats.
  assert outputs['litert_int8']['metadata']['input_dtype'] == 'uint8'
  # Raw pixels: no quantization parameters for the client to apply.
  assert outputs['litert_int8']['metadata']['input_quantization'] == (0.0, 0)
  assert outputs['litert_int8']['logits'].dtype == np.float32
  # The metadata reports what the export measured on the same split.
  quantization = exported['metadata']['litert_int8']['quantization']
  assert quantization['representative_images'] == 16
  assert quantization['eval_images'] == count
  labels = exported['labels']
  assert quantization['float_accuracy'] == pytest.approx(
      (float_top1 == labels).mean(), abs=1.5 / count)
  assert quantization['int8_accuracy'] == pytest.approx(
      (int8_top1 == labels).mean(), abs=1.5 / count)
  assert quantization['top1_agreement'] == pytest.approx(agreement,
                                                         abs=1.5 / count)
  assert quantization['accuracy_change'] == pytest.approx(
      quantization['int8_accuracy'] - quantization['float_accuracy'])


@pytest.mark.parametrize('name', ['onnx', 'litert', 'litert_int8'])
def test_metadata_names_the_classes_and_the_input(without_tensorflow, name):
  _, _, outputs = without_tensorflow
  metadata = outputs[name]['metadata']
  assert metadata['format'] == name
  assert metadata['class_names'] == list(_CLASSES)
  assert metadata['image_size'] == _SIDE
  assert metadata['input']['dtype'] == 'uint8'
  assert metadata['input']['shape'] == [None, _SIDE, _SIDE, 3]
  assert metadata['output']['shape'] == [None, len(_CLASSES)]
  # The client's resize rule: 32 / 0.875 = 36.6 -> 37, crop 32.
  assert 'resize to 37x37 and centre-crop 32x32' in metadata['input'][
      'preprocessing']


def _digests(directory):
  digests = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), 'rb') as file:
      digests[name] = hashlib.sha256(file.read()).hexdigest()
  return digests


@pytest.mark.parametrize('name', ['onnx', 'litert'])
def test_exporting_again_gives_version_2_and_keeps_version_1(exported, name):
  directory = os.path.join(exported['base'], name)
  before = _digests(os.path.join(directory, '1'))
  version, path, _ = formats.export_format(
      name, exported['model'], exported['config'], list(_CLASSES),
      exported['base'])
  assert (version, path) == (2, os.path.join(directory, '2'))
  assert sorted(os.listdir(directory)) == ['1', '2']
  assert _digests(os.path.join(directory, '1')) == before
  # predict --model=<export>/<format> takes the newest version.
  assert formats.resolve_model(directory)[1] == os.path.join(
      path, formats.FORMATS[name].model_file)


@pytest.mark.parametrize('name', ['onnx', 'litert', 'litert_int8'])
def test_predict_serves_each_format_as_the_saved_model(exported, tmp_path,
                                                       name):
  """Same top-k records; images of another size are resized here.

  The SavedModel resizes in float32; the formats take the resized pixels
  rounded to uint8, which moves probabilities by ~1e-3.
  """
  rng = np.random.default_rng(4)
  paths = []
  for i, shape in enumerate([(_SIDE, _SIDE, 3), (45, 37, 3)]):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8)).save(
        paths[-1])
  paths.append(str(tmp_path / 'not_an_image.png'))
  with open(paths[-1], 'wb') as file:
    file.write(b'GIF89a, not a PNG')
  # A truncated PNG: the decoder's own error, without TensorFlow's Python
  # stack of the function that decoded it.
  paths.append(str(tmp_path / 'truncated.png'))
  with open(paths[0], 'rb') as source, open(paths[-1], 'wb') as file:
    file.write(source.read()[:-200])
  expected = list(predict.predict_files(
      predict.load_signature(exported['paths']['saved_model']), paths))
  served = list(predict.predict_files(
      predict.load_signature(exported['paths'][name]), paths, batch_size=2))
  assert [r['file'] for r in served] == paths
  assert 'not a JPEG or PNG image' in served[2]['error']
  assert served[3]['error'] == expected[3]['error']
  assert 'File "' not in served[3]['error'], served[3]['error']
  int8 = name == 'litert_int8'
  for record, reference, tolerance in zip(
      served, expected, [0.1 if int8 else 1e-5, 0.1 if int8 else 1e-2]):
    assert [e['class_name'] for e in record['top_k']] == [
        _CLASSES[e['class_id']] for e in record['top_k']]
    if not int8:
      assert [e['class_id'] for e in record['top_k']] == [
          e['class_id'] for e in reference['top_k']]
    probabilities = {e['class_id']: e['probability'] for e in record['top_k']}
    for entry in reference['top_k']:
      assert probabilities[entry['class_id']] == pytest.approx(
          entry['probability'], abs=tolerance)


def test_a_missing_extra_is_one_error_naming_it(exported, monkeypatch,
                                                tmp_path):
  base = str(tmp_path / 'export')
  for module, name, extra in [('tf2onnx', 'onnx', 'onnx'),
                              ('onnxruntime', 'onnx', 'onnx'),
                              ('ai_edge_litert.interpreter', 'litert',
                               'litert'),
                              ('ai_edge_litert.interpreter', 'litert_int8',
                               'litert')]:
    with monkeypatch.context() as patch:
      patch.setitem(sys.modules, module, None)
      with pytest.raises(errors.MissingDependencyError,
                         match=rf'pip install keras-sft\[{extra}\]$'):
        formats.export_format(name, exported['model'], exported['config'],
                              list(_CLASSES), base)
  # Found before anything was written.
  assert not os.path.exists(base)


def _blocked_command(module, command, *arguments):
  """`python -m keras_sft.<command>` where `import module` fails."""
  code = (f'import sys; sys.modules[{module!r}] = None; import runpy; '
          f'runpy.run_module("keras_sft.{command}", run_name="__main__", '
          'alter_sys=True)')
  return subprocess.run([sys.executable, '-c', code, *arguments],
                        capture_output=True, text=True,
                        cwd=conftest.REPO_ROOT, env=conftest.cli_env(),
                        timeout=300)


def test_the_commands_name_the_missing_extra_in_one_line(exported, tmp_path):
  image = tmp_path / 'a.png'
  Image.fromarray(exported['images'][0]).save(image)
  for module, command, arguments, extra in [
      ('onnxruntime', 'predict',
       [f'--model={exported["paths"]["onnx"]}', str(image)], 'onnx'),
      ('ai_edge_litert.interpreter', 'export',
       [f'--workdir={tmp_path / "no_run"}', '--format=saved_model,litert'],
       'litert'),
  ]:
    result = _blocked_command(module, command, *arguments)
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines()
             if line.startswith('error: ')]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].endswith(f'pip install keras-sft[{extra}]'), lines


def _readme_client_code():
  with open(os.path.join(conftest.REPO_ROOT, 'README.md')) as file:
    readme = file.read()
  section = readme[readme.index("A client's resize"):
                   readme.index('### LiteRT int8')]
  return re.findall(r'```python\n(.*?)```', section, re.DOTALL)


@pytest.mark.parametrize('size', [_SIDE, 45])
def test_readme_client_snippets_run_without_tensorflow(exported, tmp_path,
                                                       size):
  """The README's ONNX and LiteRT clients print the SavedModel's class."""
  resize, onnx_client, litert_client = _readme_client_code()
  image = np.asarray(Image.fromarray(exported['images'][0]).resize(
      (size, size), Image.BILINEAR))
  Image.fromarray(image).save(tmp_path / 'cat.jpg', 'PNG')
  loaded = tf.saved_model.load(exported['paths']['saved_model'])
  expected = loaded.signatures['serve_image_bytes'](image_bytes=tf.constant(
      [(tmp_path / 'cat.jpg').read_bytes()]))['class_names'][0].numpy()
  for client, name in ((onnx_client, 'onnx'), (litert_client, 'litert')):
    code = '\n'.join([_BLOCK_TENSORFLOW, resize, client]).replace(
        f'DIR/export/{name}', os.path.join(exported['base'], name))
    result = subprocess.run([sys.executable, '-c', code],
                            capture_output=True, text=True,
                            cwd=str(tmp_path), env=conftest.cli_env(),
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == expected.decode(), name


def test_parse_formats():
  assert formats.parse_formats('saved_model, onnx,litert_int8') == (
      'saved_model', 'onnx', 'litert_int8')
  with pytest.raises(errors.ConfigError, match="format='tflite'"):
    formats.parse_formats('onnx,tflite')
  with pytest.raises(errors.ConfigError, match='twice'):
    formats.parse_formats(['onnx', 'onnx'])
  with pytest.raises(errors.ConfigError, match='at least one'):
    formats.parse_formats('')


def test_the_export_command_converts_a_run_s_resnet50_in_float32(
    smoke_run, tmp_path):
  """The real model, through `restore_run_model`, several formats at once:
  LiteRT gives the logits of the SavedModel the run exported, computing in
  float32 also for a run in mixed precision (bfloat16 would be off by
  ~1e-2), while the new SavedModel computes as the run does. (ONNX of
  ResNet50 runs in `benchmarks/run.py --quick`.)"""
  workdir = str(tmp_path / 'run')
  shutil.copytree(smoke_run[0], workdir,
                  ignore=shutil.ignore_patterns('export', 'tensorboard'))
  run = workdir_lib.Workdir(workdir)
  config = run.read_config()
  config['precision'] = 'mixed_bfloat16'
  files.write_json(run.config_file, config)
  base = tmp_path / 'export'
  result = subprocess.run(
      [sys.executable, '-m', 'keras_sft.export', f'--workdir={workdir}',
       f'--export_base={base}', '--checkpoint=last',
       '--format=saved_model,litert'],
      capture_output=True, text=True, cwd=conftest.REPO_ROOT,
      env=conftest.cli_env(), timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == [str(base / '1'),
                                   str(base / 'litert' / '1')]
  images = np.random.default_rng(5).integers(
      0, 256, (3, 32, 32, 3)).astype(np.uint8)
  reference = _saved_model_logits(conftest.version_dir(smoke_run[0]), images)
  scale = np.abs(reference).max()
  format_name, path = formats.resolve_model(str(base / 'litert'))
  assert format_name == 'litert'
  logits = formats.load('litert', path).logits(images)
  assert np.abs(logits - reference).max() <= (
      _FLOAT_RELATIVE_TOLERANCE * scale)
  bfloat16 = _saved_model_logits(str(base / '1'), images)
  assert np.abs(bfloat16 - reference).max() > (
      _FLOAT_RELATIVE_TOLERANCE * scale)
  metadata = formats.read_metadata('litert', path)
  assert metadata['class_names'] == files.read_json(
      run.dataset_file)['class_names']
  assert metadata['source']['checkpoint'] == 'last'


def _backbone_ops_model(mode):
  """The preprocessing of `mode` and the ops of the other backbones.

  ConvNeXt's exact GELU (TensorFlow's Erfc), LayerNormalization and layer
  scale, MobileNetV3's hard-swish, depthwise convolutions.
  """
  inputs = keras.Input((_SIDE, _SIDE, 3))
  features = backbones.Preprocessing(mode)(inputs)
  features = keras.layers.DepthwiseConv2D(3, strides=2)(features)
  features = keras.layers.Conv2D(8, 1, activation='hard_swish')(features)
  features = keras.layers.LayerNormalization(epsilon=1e-6)(features)
  features = keras.layers.Dense(8, activation='gelu')(features)
  features = keras.layers.Rescaling(0.5)(features)  # As a layer scale.
  features = keras.layers.GlobalAveragePooling2D()(features)
  return keras.Model(inputs, keras.layers.Dense(len(_CLASSES))(features))


@pytest.mark.parametrize('mode', backbones.PREPROCESSING_MODES)
def test_onnx_of_every_backbone_s_preprocessing_and_ops_runs(tmp_path, mode):
  """One graph input, `images`, and the float logits, for each backbone.

  Keras' Normalization layer (EfficientNetV2-B*, ConvNeXt) holds its mean
  and variance as captured tensors, which became extra graph inputs, and
  ConvNeXt's exact GELU is TensorFlow's Erfc, which ONNX has no op for.
  """
  keras.utils.set_random_seed(0)
  module = graph.logits_module(_backbone_ops_model(mode), _SIDE)
  path = str(tmp_path / 'model.onnx')
  import onnx  # pylint: disable=g-import-not-at-top
  onnx.save(onnx_format.onnx_model(module), path)
  runtime = formats.load('onnx', path)
  assert [i.name for i in runtime._session.get_inputs()] == ['images']  # pylint: disable=protected-access
  images = np.random.default_rng(6).integers(
      0, 256, (3, _SIDE, _SIDE, 3)).astype(np.uint8)
  reference = module.logits(tf.constant(images))['logits'].numpy()
  logits = runtime.logits(images)
  assert np.abs(logits - reference).max() <= (
      _FLOAT_RELATIVE_TOLERANCE * np.abs(reference).max())


# By default the cheapest member of each family; KERAS_SFT_ALL_BACKBONES=1
# runs every `backbones.BACKBONES` entry (as tests/models_backbones_test.py).
_MATRIX = [name for name, spec in backbones.BACKBONES.items()
           if spec.cheapest or os.environ.get('KERAS_SFT_ALL_BACKBONES') == '1']


def _softmax(logits):
  """The reference: float64 softmax of the float32 logits served."""
  logits = np.asarray(logits, np.float64)
  exponentials = np.exp(logits - logits.max(-1, keepdims=True))
  return exponentials / exponentials.sum(-1, keepdims=True)


def _check_probabilities(outputs, where):
  assert 'probabilities' in outputs, (where, sorted(outputs))
  logits, probabilities = outputs['logits'], outputs['probabilities']
  assert logits.dtype == probabilities.dtype == np.float32, where
  assert np.isfinite(logits).all(), where
  np.testing.assert_allclose(probabilities, _softmax(logits), rtol=0,
                             atol=1e-6, err_msg=where)
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=0, atol=1e-6,
                             err_msg=where)


@pytest.mark.parametrize('name', _MATRIX)
def test_every_export_s_probabilities_are_the_softmax_of_its_logits(
    tmp_path, name):
  """Issue 25: `probabilities` = softmax(`logits`) to 1e-6 in the SavedModel
  (both signatures, images of the training side and of another size), ONNX
  and LiteRT float, for the preprocessing and ops of each family.

  The SavedModel under mixed_bfloat16 (a run with precision='auto' on a CPU
  with AVX512_BF16 exports so), the others in float32 (as
  `formats.export_run` converts them). Outputs are read through each
  runtime's own API, not through keras_sft.
  """
  mode = backbones.backbone_spec(name).preprocessing
  keras.utils.set_random_seed(0)
  with precision.global_policy('mixed_bfloat16'):
    mixed = _backbone_ops_model(mode)
  directory = str(tmp_path / 'saved_model')
  saved_model.export_saved_model(mixed, directory, _SIDE, list(_CLASSES))
  signatures = tf.saved_model.load(directory).signatures
  rng = np.random.default_rng(25)
  for shape in [(2, _SIDE, _SIDE, 3), (2, 45, 37, 3)]:
    images = rng.integers(0, 256, shape).astype(np.uint8)
    outputs = signatures['serving_default'](images=tf.constant(images))
    _check_probabilities({key: value.numpy() for key, value in
                          outputs.items()}, f'serving_default {shape}')
    encoded = tf.constant([tf.io.encode_png(image).numpy()
                           for image in images])
    outputs = signatures['serve_image_bytes'](image_bytes=encoded)
    _check_probabilities({key: value.numpy() for key, value in
                          outputs.items()}, f'serve_image_bytes {shape}')
  network = _backbone_ops_model(mode)
  network.set_weights(mixed.get_weights())
  module = graph.logits_module(network, _SIDE)
  images = rng.integers(0, 256, (2, _SIDE, _SIDE, 3)).astype(np.uint8)
  import onnxruntime  # pylint: disable=g-import-not-at-top
  session = onnxruntime.InferenceSession(
      onnx_format.onnx_model(module).SerializeToString(),
      providers=['CPUExecutionProvider'])
  names = [output.name for output in session.get_outputs()]
  _check_probabilities(
      dict(zip(names, session.run(names, {'images': images}))), 'onnx')
  from ai_edge_litert import interpreter  # pylint: disable=g-import-not-at-top
  runner = interpreter.Interpreter(
      model_content=litert_format.litert_model(module)).get_signature_runner()
  _check_probabilities(runner(images=images), 'litert')


def test_an_export_its_runtime_does_not_reproduce_is_not_written(
    tmp_path, monkeypatch):
  """tf2onnx writes a model with ops it could not convert (it logs them and
  goes on); the export runs each float model once in its runtime and
  refuses one that fails or gives other logits."""
  keras.utils.set_random_seed(0)
  model = _backbone_ops_model('caffe')
  config = default_lib.get_config()
  config.image_size = _SIDE
  base = str(tmp_path / 'export')
  monkeypatch.setattr(onnx_format, '_replace_erfc', lambda graph_def: None)
  with pytest.raises(RuntimeError, match=r'onnx.*Erfc'):
    formats.export_format('onnx', model, config, list(_CLASSES), base)
  # A LiteRT model of another network: it runs, with other logits.
  other = litert_format.litert_model(graph.logits_module(_small_model(), _SIDE))
  monkeypatch.setattr(litert_format, 'litert_model', lambda module: other)
  with pytest.raises(RuntimeError, match=r'litert.*logits'):
    formats.export_format('litert', model, config, list(_CLASSES), base)
  for name in ('onnx', 'litert'):
    assert os.listdir(os.path.join(base, name)) == []


def _edited_litert(exported, tmp_path, name, edit):
  directory = tmp_path / name
  shutil.copytree(exported['paths']['litert'], directory)
  metadata = json.loads((directory / litert_format.METADATA_FILE).read_text())
  text = edit(metadata)
  (directory / litert_format.METADATA_FILE).write_text(
      text if isinstance(text, str) else json.dumps(metadata))
  return str(directory)


def test_predict_refuses_a_damaged_model_or_metadata_in_one_error(
    exported, tmp_path):
  """A model file that does not load, and metadata that does not describe
  the model (whose LiteRT input takes any size: an edited image_size was
  served silently, resized to the wrong size), are one DataError each."""
  with open(os.path.join(exported['paths']['onnx'], 'model.onnx'),
            'rb') as file:
    contents = file.read()
  (tmp_path / 'truncated.onnx').write_bytes(contents[:len(contents) // 2])
  (tmp_path / 'text.onnx').write_text('not a model')
  (tmp_path / 'alone').mkdir()
  shutil.copy(os.path.join(exported['paths']['litert'], 'model.tflite'),
              tmp_path / 'alone')
  damaged = {
      str(tmp_path / 'alone'): 'no keras_sft metadata .metadata.json',
      str(tmp_path / 'truncated.onnx'): 'does not load',
      str(tmp_path / 'text.onnx'): 'does not load',
      _edited_litert(exported, tmp_path, 'size', lambda metadata: metadata
                     .update(image_size=2 * _SIDE)):
          f'image_size={2 * _SIDE}.*{_SIDE}x{_SIDE}',
      _edited_litert(exported, tmp_path, 'fewer', lambda metadata: metadata
                     .update(class_names=['a', 'b'])):
          '2 class names.*3 logits',
      _edited_litert(exported, tmp_path, 'more', lambda metadata: metadata
                     .update(class_names=list('abcd'))):
          '4 class names.*3 logits',
      _edited_litert(exported, tmp_path, 'json', lambda metadata: '{oops'):
          'metadata.json is not JSON',
  }
  for path, message in damaged.items():
    with pytest.raises(errors.DataError, match=message):
      predict.load_signature(path)


def test_int8_metadata_counts_the_images_it_was_calibrated_on(exported,
                                                              tmp_path):
  """More representative images asked for than the train split holds: all
  of them calibrate, and the metadata says how many there were."""
  config = exported['config'].copy_and_resolve_references()
  config.export_representative_images = 1000
  _, _, metadata = formats.export_format(
      'litert_int8', exported['model'], config, list(_CLASSES),
      str(tmp_path / 'export'))
  assert metadata['quantization']['representative_images'] == (
      _COUNTS['train'] * len(_CLASSES))


def test_int8_data_that_is_gone_stops_the_export_before_any_format(
    smoke_run, tmp_path):
  """litert_int8 reads the run's data; its absence was found after the
  formats before it had been written."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(smoke_run[0], workdir,
                  ignore=shutil.ignore_patterns('export', 'tensorboard'))
  run = workdir_lib.Workdir(workdir)
  config = run.read_config()
  config['dataset'] = f'folder:{tmp_path / "gone"}'
  files.write_json(run.config_file, config)
  with pytest.raises(errors.UserError, match='gone'):
    formats.export_run(workdir, 'saved_model,onnx,litert_int8')
  assert not os.path.exists(run.export)


def test_an_int8_calibration_count_below_one_is_one_config_error(
    smoke_run, tmp_path):
  """A config.json edited to export_representative_images=0 ended in a
  tf.data traceback (shuffle buffer_size 0)."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(smoke_run[0], workdir,
                  ignore=shutil.ignore_patterns('export', 'tensorboard'))
  run = workdir_lib.Workdir(workdir)
  config = run.read_config()
  config['export_representative_images'] = 0
  files.write_json(run.config_file, config)
  with pytest.raises(errors.ConfigError,
                     match='export_representative_images=0'):
    formats.export_run(workdir, 'litert_int8')
  assert not os.path.exists(run.export)


_TEMPERATURE = 2.5


def _check_scaled_probabilities(outputs, where):
  """`probabilities` = softmax(`logits` / T) to 1e-6, in float32."""
  logits, probabilities = outputs['logits'], outputs['probabilities']
  assert logits.dtype == probabilities.dtype == np.float32, where
  np.testing.assert_allclose(probabilities, _softmax(logits / _TEMPERATURE),
                             rtol=0, atol=1e-6, err_msg=where)
  # Not the uncalibrated softmax: the test could fail.
  assert np.abs(probabilities - _softmax(logits)).max() > 1e-3, where


def test_a_calibrated_export_serves_softmax_of_logits_over_t_in_every_format(
    exported, tmp_path):
  """Issue 23: with a fitted temperature T, every format's probabilities are
  softmax(logits / T) to 1e-6 (the SavedModel's two signatures, ONNX and
  LiteRT float in their runtimes, litert_int8 through predict, which
  divides by the T of its metadata), the logits stay those of the
  uncalibrated export, and every metadata records T and its split."""
  record = {'temperature': _TEMPERATURE, 'split': 'val', 'num_examples': 9,
            'step': 3, 'weights': 'raw'}
  base = str(tmp_path / 'export')
  paths, metadata = {}, {}
  for name in formats.FORMATS:
    _, paths[name], metadata[name] = formats.export_format(
        name, exported['model'], exported['config'], list(_CLASSES), base,
        source={'test': True}, calibration=record)
    assert metadata[name]['temperature'] == _TEMPERATURE, name
    assert metadata[name]['calibration'] == record, name
  with open(os.path.join(paths['saved_model'],
                         saved_model.METADATA_FILE)) as file:
    assert json.load(file)['temperature'] == _TEMPERATURE
  images = exported['images'][:6]
  signatures = tf.saved_model.load(paths['saved_model']).signatures
  outputs = signatures['serving_default'](images=tf.constant(images))
  _check_scaled_probabilities(
      {key: value.numpy() for key, value in outputs.items()},
      'serving_default')
  np.testing.assert_allclose(
      outputs['logits'].numpy(),
      _saved_model_logits(exported['paths']['saved_model'], images),
      rtol=0, atol=1e-6)
  np.testing.assert_allclose(outputs['top_k_probabilities'].numpy()[:, 0],
                             outputs['probabilities'].numpy().max(-1),
                             rtol=0, atol=1e-7)
  encoded = tf.constant([tf.io.encode_png(image).numpy() for image in images])
  _check_scaled_probabilities(
      {key: value.numpy() for key, value in signatures['serve_image_bytes'](
          image_bytes=encoded).items()}, 'serve_image_bytes')
  for name in ('onnx', 'litert'):
    runtime = formats.load(name, os.path.join(
        paths[name], formats.FORMATS[name].model_file))
    _check_scaled_probabilities(runtime.outputs(images), name)
    assert formats.read_metadata(name, os.path.join(
        paths[name], formats.FORMATS[name].model_file))[
            'temperature'] == _TEMPERATURE
  int8_file = os.path.join(paths['litert_int8'], litert_format.MODEL_FILE)
  int8_logits = formats.load('litert_int8', int8_file).logits(images)
  served = predict.load_signature(paths['litert_int8'])(
      image_bytes=encoded)
  np.testing.assert_allclose(
      served['top_k_probabilities'].numpy(),
      np.sort(_softmax(int8_logits / _TEMPERATURE), -1)[:, ::-1][:, :3],
      rtol=0, atol=1e-6)


@pytest.mark.parametrize('value', [1e-300, 1e-30, 1e30, True, '2'])
def test_a_temperature_outside_the_fitted_range_is_refused(value):
  """float32(1e-300) is 0 and logits / 1e-30 overflow float32: either
  would serve NaN probabilities."""
  with pytest.raises(errors.ConfigError, match='temperature'):
    saved_model.check_temperature(value)


def test_a_temperature_at_the_ends_of_the_fitted_range_is_served():
  assert saved_model.check_temperature(0.01) == 0.01
  assert saved_model.check_temperature(100) == 100.0


def test_a_temperature_that_is_not_positive_is_refused(exported, tmp_path):
  for value in (0.0, -1.0, float('nan')):
    with pytest.raises(errors.ConfigError, match='temperature'):
      formats.export_format('litert', exported['model'], exported['config'],
                            list(_CLASSES), str(tmp_path),
                            calibration={'temperature': value})
