"""`python -m keras_sft.main` on tfds mock data, for tests (no downloads).

Every tfds dataset yields random examples of its real shapes; the number per
split comes from $MOCK_NUM_EXAMPLES (default 64).
"""

import os
import sys

import tensorflow_datasets as tfds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_sft import cli  # pylint: disable=g-import-not-at-top
from keras_sft import main  # pylint: disable=g-import-not-at-top

if __name__ == '__main__':
  with tfds.testing.mock_data(
      num_examples=int(os.environ.get('MOCK_NUM_EXAMPLES', '64'))):
    cli.run(main.main)
