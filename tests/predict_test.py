"""`python -m keras_sft.predict`: top-k labels of image files as JSON lines."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import conftest
import image_fixtures
from keras_sft.export import saved_model
from keras_sft import predict


def _write_png(path, array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, 'PNG')
  path.write_bytes(buffer.getvalue())


def test_image_paths_expands_folders_in_order(tmp_path):
  (tmp_path / 'd' / 'sub').mkdir(parents=True)
  for name in ('d/b.PNG', 'd/a.jpg', 'd/sub/c.jpeg', 'd/notes.txt', 'e.png'):
    (tmp_path / name).write_bytes(b'')
  files = predict.image_paths([str(tmp_path / 'e.png'), str(tmp_path / 'd')])
  assert [os.path.relpath(f, tmp_path) for f in files] == [
      'e.png', 'd/a.jpg', 'd/b.PNG', 'd/sub/c.jpeg']
  # A missing path stays in its place: predict_files gives it an error
  # record and serves the rest.
  assert predict.image_paths([str(tmp_path / 'd' / 'sub'),
                              str(tmp_path / 'missing.png')]) == [
                                  str(tmp_path / 'd' / 'sub' / 'c.jpeg'),
                                  str(tmp_path / 'missing.png')]


def test_predict_prints_top_k_per_file_and_names_bad_files(smoke_run,
                                                           tmp_path):
  workdir, _ = smoke_run
  images = np.random.default_rng(2).integers(
      0, 256, (2, 32, 32, 3)).astype(np.uint8)
  folder = tmp_path / 'images'
  folder.mkdir()
  _write_png(folder / 'a.png', images[0])
  (folder / 'b.png').write_bytes(b'GIF89a, not a PNG')
  _write_png(folder / 'c.png', images[1])
  result = subprocess.run(
      [sys.executable, '-m', 'keras_sft.predict',
       f'--model={os.path.join(workdir, "export")}', '--batch_size=8',
       str(folder)],
      capture_output=True, text=True, cwd=conftest.REPO_ROOT,
      env=conftest.cli_env(), timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  records = [json.loads(line) for line in result.stdout.splitlines()]
  assert [os.path.basename(r['file']) for r in records] == [
      'a.png', 'b.png', 'c.png']
  assert 'not a JPEG or PNG image' in records[1]['error']

  # The same images through the export's uint8 signature, in this process.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  loaded = tf.saved_model.load(conftest.version_dir(workdir))
  probabilities = loaded.signatures['serving_default'](
      images=tf.constant(images))['probabilities'].numpy()
  for record, expected in zip((records[0], records[2]), probabilities):
    top5 = np.argsort(-expected)[:5]
    assert [entry['class_id'] for entry in record['top_k']] == list(top5)
    assert [entry['class_name'] for entry in record['top_k']] == [
        str(i) for i in top5]
    np.testing.assert_allclose(
        [entry['probability'] for entry in record['top_k']], expected[top5],
        atol=1e-5)  # Other batch shapes: oneDNN rounds differently (~1e-6).


@pytest.fixture(scope='module')
def tiny_signature(tmp_path_factory):
  """`serve_image_bytes` of a tiny 8px, 3-class SavedModel."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  inputs = keras.Input((8, 8, 3))
  model = keras.Model(inputs, keras.layers.Dense(3)(
      keras.layers.GlobalAveragePooling2D()(inputs)))
  export_dir = str(tmp_path_factory.mktemp('tiny') / 'model')
  saved_model.export_saved_model(model, export_dir, 8, ['a', 'b', 'c'])
  return tf.saved_model.load(export_dir).signatures['serve_image_bytes']


def test_bad_files_are_error_records_and_the_good_ones_are_served(
    tiny_signature, tmp_path):
  rng = np.random.default_rng(3)
  _write_png(tmp_path / 'good1.png', rng.integers(0, 256, (9, 9, 3), np.uint8))
  (tmp_path / 'bmp.png').write_bytes(b'BM\xcf\x00\x01\x02\x03\x04')
  _write_png(tmp_path / 'whole.png', rng.integers(0, 256, (9, 9, 3), np.uint8))
  data = (tmp_path / 'whole.png').read_bytes()
  (tmp_path / 'truncated.png').write_bytes(data[:len(data) // 2])
  os.remove(tmp_path / 'whole.png')
  os.symlink(tmp_path / 'deleted.png', tmp_path / 'dangling.png')
  _write_png(tmp_path / 'good2.png', rng.integers(0, 256, (9, 9, 3), np.uint8))
  (tmp_path / 'bomb.png').write_bytes(image_fixtures.png_bomb(16_000))
  names = ['good1.png', 'bmp.png', 'truncated.png', 'dangling.png',
           'bomb.png', 'good2.png']
  for batch_size in (1, 8):
    records = list(predict.predict_files(
        tiny_signature, [str(tmp_path / name) for name in names],
        batch_size=batch_size))
    assert [os.path.basename(r['file']) for r in records] == names
    good = [r for r in records if 'top_k' in r]
    assert [os.path.basename(r['file']) for r in good] == [
        'good1.png', 'good2.png']
    errors = {os.path.basename(r['file']): r['error'] for r in records
              if 'error' in r}
    assert 'not a JPEG or PNG image' in errors['bmp.png']
    assert '42 4d cf' in errors['bmp.png']
    assert 'Invalid PNG data' in errors['truncated.png'], errors
    assert 'No such file' in errors['dangling.png'], errors['dangling.png']
    assert 'is 16000x16000 pixels' in errors['bomb.png'], errors['bomb.png']
    # Every message is one readable line, valid JSON.
    for message in errors.values():
      json.loads(json.dumps(message))
      assert '\n' not in message and 'node' not in message, message


def test_a_missing_file_is_an_error_record_and_the_rest_are_served(
    tiny_signature, tmp_path):
  """`predict folder/ missing.jpg` exited 2 and served nothing."""
  (tmp_path / 'folder').mkdir()
  _write_png(tmp_path / 'folder' / 'a.png', np.zeros((9, 9, 3), np.uint8))
  files = predict.image_paths([str(tmp_path / 'folder'),
                               str(tmp_path / 'missing.jpg')])
  records = list(predict.predict_files(tiny_signature, files))
  assert [os.path.basename(r['file']) for r in records] == [
      'a.png', 'missing.jpg']
  assert 'top_k' in records[0]
  assert 'No such file' in records[1]['error'], records[1]


def _predict(*arguments):
  return subprocess.run(
      [sys.executable, '-m', 'keras_sft.predict', *arguments],
      capture_output=True, text=True, cwd=conftest.REPO_ROOT,
      env=conftest.cli_env(), timeout=300)


def test_no_images_and_a_damaged_export_are_one_error_line(tmp_path):
  image = tmp_path / 'a.png'
  _write_png(image, np.zeros((4, 4, 3), np.uint8))
  damaged = tmp_path / 'export' / '1'
  damaged.mkdir(parents=True)
  (damaged / 'saved_model.pb').write_bytes(b'not a SavedModel')
  empty = tmp_path / 'empty'
  empty.mkdir()
  for arguments, expected in [
      ([f'--model={damaged}', str(empty)], 'Give image files'),
      ([f'--model={damaged}', str(image)], 'saved_model.pb'),
      ([f'--model={tmp_path / "export"}', str(image)], 'saved_model.pb'),
  ]:
    result = _predict(*arguments)
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines()
             if line.startswith('error: ')]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-3000:]
    assert 'flags:' not in result.stderr  # No usage text.


def test_a_batch_size_below_one_is_a_user_error(tmp_path):
  """`--batch_size=0` ended in a ValueError traceback, not one error line."""
  from keras_sft import errors  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match='batch_size=0'):
    list(predict.predict_files(None, [str(tmp_path / 'a.png')], 0))
