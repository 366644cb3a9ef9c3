"""`python -m keras_sft.tune` with an access log of the image files listed.

Every split `folders.find_splits` returns is logged to
$TUNE_ACCESS_LOG, one path a line, and `FINAL` is logged when the final step
starts: a test reads whether the test split was listed before the search
ended. A folder's files are read only after being listed there.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_sft import cli  # pylint: disable=g-import-not-at-top
from keras_sft.data import folders  # pylint: disable=g-import-not-at-top
from keras_sft.tune import __main__ as tune_main  # pylint: disable=g-import-not-at-top
from keras_sft.tune import final  # pylint: disable=g-import-not-at-top


def _log(lines):
  with open(os.environ['TUNE_ACCESS_LOG'], 'a') as file:
    file.writelines(f'{line}\n' for line in lines)


def _logged_find_splits(real):

  def find_splits(*args, **kwargs):
    class_names, train, evaluation = real(*args, **kwargs)
    _log(list(train.paths) + list(evaluation.paths))
    return class_names, train, evaluation

  return find_splits


def _logged_final(real):

  def run(*args, **kwargs):
    _log(['FINAL'])
    return real(*args, **kwargs)

  return run


if __name__ == '__main__':
  folders.find_splits = _logged_find_splits(folders.find_splits)
  final.run = _logged_final(final.run)
  cli.run(tune_main.main)
