"""README's library example runs as written (on mock data, no weights)."""

import os
import re

import tensorflow as tf

import conftest


def _library_example():
  with open(os.path.join(conftest.REPO_ROOT, 'README.md')) as file:
    readme = file.read()
  section = readme.split('## Use it as a library', 1)[1]
  return re.search(r'```python\n(.*?)```', section, re.DOTALL).group(1)


def test_library_example_trains_and_exports(mock_cifar10, tmp_path):
  code = _library_example()
  # Offline here: no ImageNet weights; write the export under tmp_path.
  code, count = re.subn(r'^WEIGHTS = .*$', 'WEIGHTS = None', code,
                        flags=re.MULTILINE)
  assert count == 1
  export_dir = str(tmp_path / 'export')
  code, count = re.subn(r'^EXPORT_DIR = .*$', f'EXPORT_DIR = {export_dir!r}',
                        code, flags=re.MULTILINE)
  assert count == 1
  namespace = {}
  exec(compile(code, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['model'].optimizer.iterations.numpy() == (
      namespace['EPOCHS'] * namespace['steps_per_epoch'])
  loaded = tf.saved_model.load(export_dir)
  outputs = loaded.signatures['serving_default'](
      images=tf.zeros([2, 40, 40, 3], tf.uint8))
  assert outputs['probabilities'].shape == (2, 10)
